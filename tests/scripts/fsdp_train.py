"""The standalone AdaHessian on ddp_train.py's tiny BERT sharded by FSDP2, for tests/test_fsdp.py.

    torchrun --nproc_per_node 2 --standalone tests/scripts/fsdp_train.py --out DIR --batch B --cases ...
    python tests/scripts/fsdp_train.py --out DIR --batch 2B --cases ...      # the single-process reference

``fully_shard`` on each encoder layer and on the root, the optimizer with a closure
(``opt.step(closure)``, finite differences): probes, perturbation, estimate and state live on
each rank's shard (DTensors).  Each case writes DIR/CASE/rank{r}.pt (full parameters) and
rank{r}.json (how the parameters and the state were sharded, the logged losses).

Cases: ``loop_fd_fp64`` (forward differences, float64), ``loop_fd_central_fp64`` (central),
``loop_fd`` (forward, float32, eps=1e-2).

Trainer cases (``trainer_*``): the Trainer's own ``--fsdp full_shard`` with FSDP2, through
accelerate.  accelerate takes its FSDP path only for accelerator device types (on CPU it would
train with DDP), so under torchrun :func:`fsdp_on_cpu` sets the distributed type accelerate sets
on a GPU; FSDP2 itself runs on gloo.  ``trainer_fd_resume_fp64`` also resumes from its step-2
checkpoint (DIR/trainer_fd_resume_fp64_resumed/, and the same for trainer_fd_resume_sga_fp64).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_train  # noqa: E402

from hf_adahessian import AdaHessian  # noqa: E402

MAX_STEPS = 4
CASES = {
    "loop_fd_fp64": dict(dtype=torch.float64, kwargs={}),
    "loop_fd_central_fp64": dict(dtype=torch.float64, kwargs={"fd_scheme": "central"}),
    "loop_fd": dict(dtype=torch.float32, kwargs={"eps": 1e-2}),
}
LEARNING_RATE = 0.05

# The Trainer's --fsdp (FSDP2 through accelerate), each with its single-process reference (the same
# case without the sharding, batch 2B).  BertLayer is named: accelerate 1.16's default wrap shards
# the embeddings twice (``fully_shard`` on an already sharded nn.Embedding fails).
FSDP_ARGS = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
FD = "hessian_interval=1,hessian_estimator=finite_difference"
TRAINER_CASES = {
    # A control of the set-up: stock AdamW under the Trainer's FSDP2.
    "trainer_adamw": dict(optim="adamw_torch", learning_rate=1e-3, optim_args=None, grad_acc=1, model="told"),
    "trainer_adamw_ga2_fp64": dict(optim="adamw_torch", learning_rate=1e-3, optim_args=None, grad_acc=2, model="told",
                                   dtype=torch.float64),
    "trainer_fd_fp64": dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, optim_args=FD, grad_acc=1),
    # Accumulation: every micro-batch of a Hessian step is reduced (fsdp_gradient_sync), the others are not.
    "trainer_fd_i2_ga2_fp64": dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, grad_acc=2,
                                   optim_args="hessian_interval=2,hessian_estimator=finite_difference"),
    # The stale guard (its gradient norms completed across the shards) and the floor on rows with few estimates
    # (its mean too), interval 2.
    "trainer_fd_i2_sg_fp64": dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, grad_acc=1,
                                  optim_args="hessian_interval=2,hessian_estimator=finite_difference,stale_guard=true,"
                                             "min_row_estimates=3"),
    # The guard's average reference: its per-row averages, sharded as the rows are.
    "trainer_fd_i2_sga_fp64": dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, grad_acc=1,
                                   optim_args="hessian_interval=2,hessian_estimator=finite_difference,"
                                              "stale_guard=true,stale_guard_reference=average"),
    # clip_hessian: the clipping factor comes from the norm of the whole gradient, reduced across the shards.
    # --max_grad_norm 1e-3 clips every step (the norms are 0.05 to 0.5; measured 1.4e-10 of the distance trained).
    "trainer_fd_i2_sga_ch_fp64": dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, grad_acc=1,
                                      optim_args="hessian_interval=2,hessian_estimator=finite_difference,"
                                                 "stale_guard=true,stale_guard_reference=average,clip_hessian=true",
                                      trainer_args={"max_grad_norm": 1e-3}),
    "trainer_fd": dict(optim="adahessian", learning_rate=0.05, optim_args=FD + ",eps=1e-2", grad_acc=1),
}
# Resume under FSDP2: 4 steps saving at step 2 (the sharded optimizer state through accelerate's
# distributed checkpoint), then a fresh Trainer resumes from checkpoint-2 to step 4.
# The stale guard and time weighting put every optional state key into the checkpoint.
RESUME = dict(optim="adahessian", learning_rate=0.05, dtype=torch.float64, grad_acc=1,
              optim_args="hessian_interval=2,hessian_estimator=finite_difference,stale_guard=true,time_weighted=true")
TRAINER_CASES["trainer_fd_resume_fp64"] = dict(RESUME, trainer_args={"save_strategy": "steps", "save_steps": 2})
# ... and the average reference's keys (scalars and per-row averages).
TRAINER_CASES["trainer_fd_resume_sga_fp64"] = dict(
    TRAINER_CASES["trainer_fd_resume_fp64"],
    optim_args="hessian_interval=2,hessian_estimator=finite_difference,stale_guard=true,stale_guard_reference=average")
RESUMED = ("trainer_fd_resume_fp64", "trainer_fd_resume_sga_fp64")
for case in TRAINER_CASES.values():
    case["distributed_args"] = FSDP_ARGS
ddp_train.CASES.update(TRAINER_CASES)  # ddp_train.run_case trains them


def run_resumed(name: str, batch: int, out: Path) -> None:
    """``name``: trained whole with a checkpoint at step 2; ``name``_resumed: from that checkpoint."""
    ddp_train.run_case(name, batch, out)
    checkpoint = out / name / "trainer" / "checkpoint-2"
    ddp_train.CASES[f"{name}_resumed"] = dict(TRAINER_CASES[name], resume_from=str(checkpoint),
                                              trainer_args={"save_strategy": "no"})
    ddp_train.run_case(f"{name}_resumed", batch, out)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach().clone()


def sharding(model: torch.nn.Module, optimizer) -> dict:
    params = list(model.parameters())
    sharded = [p for p in params if type(p).__name__ == "DTensor"]
    state = [v for p in sharded for v in optimizer.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"params": len(params), "sharded_params": len(sharded),
            "local_numel": sum(p.to_local().numel() for p in sharded), "numel": sum(p.numel() for p in params),
            "sharded_state": all(type(v).__name__ == "DTensor" for v in state) and bool(state)}


def loop(spec: dict, batch: int) -> tuple[torch.nn.Module, dict, list]:
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    model = ddp_train.make_model().to(spec["dtype"])
    model.train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    opt = AdaHessian(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, seed=42,
                     hessian_estimator="finite_difference", **spec["kwargs"])
    rows = ddp_train.make_dataset()
    logs = []
    for step in range(MAX_STEPS):
        start = step * batch * world + rank * batch
        chunk = rows[start:start + batch]
        inputs = {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}

        def closure():
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            return loss

        loss = opt.step(closure)
        logs.append({"loss": float(loss), "hessian_mean": opt.last_hessian_mean})
    return model, sharding(model, opt), logs


def run_case(name: str, batch: int, out: Path) -> None:
    if name in RESUMED:
        return run_resumed(name, batch, out)
    if name in TRAINER_CASES:
        return ddp_train.run_case(name, batch, out)
    case_dir = out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    model, info, logs = loop(CASES[name], batch)
    rank = dist.get_rank() if dist.is_initialized() else 0
    info.update(case=name, rank=rank, model_class=type(model).__name__, logs=logs)
    torch.save({k: full(v) for k, v in model.state_dict().items()}, case_dir / f"rank{rank}.pt")
    if rank == 0:
        torch.manual_seed(0)
        torch.save({k: v.detach().clone() for k, v in ddp_train.make_model().to(CASES[name]["dtype"]).state_dict().items()},
                   case_dir / "init.pt")
    (case_dir / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def fsdp_on_cpu() -> None:
    """Let accelerate take its FSDP path on CPU processes, as it does on GPU ones.

    accelerate turns ``--fsdp`` into FSDP only for accelerator device types; on CPU it
    keeps MULTI_CPU and the Trainer trains with DDP.  FSDP2 itself runs on gloo, so
    the test sets the distributed type accelerate would have set on a GPU.
    """
    import accelerate.state
    from accelerate.utils import DistributedType

    init = accelerate.state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = patched


def init_process_group() -> None:
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        fsdp_on_cpu()


def main() -> None:
    ddp_train.main(__doc__.splitlines()[0], {**CASES, **TRAINER_CASES}, run_case, setup=init_process_group)


if __name__ == "__main__":
    main()
