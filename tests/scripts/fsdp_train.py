"""The standalone AdaHessian on ddp_train.py's tiny BERT sharded by FSDP2, for tests/test_fsdp.py.

    torchrun --nproc_per_node 2 --standalone tests/scripts/fsdp_train.py --out DIR --batch B --cases ...
    python tests/scripts/fsdp_train.py --out DIR --batch 2B --cases ...      # the single-process reference

``fully_shard`` on each encoder layer and on the root, the optimizer with a closure
(``opt.step(closure)``, finite differences): probes, perturbation, estimate and state live on
each rank's shard (DTensors).  Each case writes DIR/CASE/rank{r}.pt (full parameters) and
rank{r}.json (how the parameters and the state were sharded, the logged losses).

Cases: ``loop_fd_fp64`` (forward differences, float64), ``loop_fd_central_fp64`` (central),
``loop_fd`` (forward, float32, eps=1e-2).

Not here: the Trainer's ``--fsdp``.  accelerate (1.15) turns FSDP on only for GPU-type
set-ups, so on CPU the Trainer's ``--fsdp`` trains with DDP; the package refuses ``--fsdp``.
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


def init_process_group() -> None:
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")


def main() -> None:
    ddp_train.main(__doc__.splitlines()[0], CASES, run_case, setup=init_process_group)


if __name__ == "__main__":
    main()
