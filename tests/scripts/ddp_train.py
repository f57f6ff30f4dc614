"""Train a tiny BERT classifier with AdaHessianTrainer, for tests/test_distributed.py.

    torchrun --nproc_per_node 2 --standalone tests/scripts/ddp_train.py --out DIR --batch B --cases ...
    python tests/scripts/ddp_train.py --out DIR --batch 2B --cases ...      # the single-process reference

Several cases run one after the other in the same processes (a torchrun launch
costs ~10 s).  For each case every rank writes, under DIR/CASE/:

* ``rank{r}.pt``: the final parameters (``state_dict`` of the unwrapped model);
* ``rank{r}.json``: the parallel set-up accelerate chose, the optimizer class,
  the input rows of every micro-batch this rank trained on, and the logged
  losses and Hessian means;
* ``init.pt`` (rank 0): the initial parameters, to check that training moved them.

The data order is deterministic: ``train_sampling_strategy="sequential"``, and
accelerate's ``BatchSamplerShard`` (``split_batches=False``) hands batch
``k*W + r`` of the sequential sampler to rank ``r`` of ``W``.  So with batch B
per rank on 2 ranks, optimizer step (and micro-batch) k covers exactly the
samples one process with batch 2B sees at the same step.

Cases (``--cases`` takes a comma-separated list):

* ``adahessian``: ``--optim adahessian``, hessian_interval=1;
* ``adahessian_i2_ga2``: hessian_interval=2 and gradient_accumulation_steps=2;
* ``adamw``: stock ``adamw_torch`` (DDP's own gradient all-reduce);
* ``adahessian_no_allreduce``: as ``adahessian`` with the package's all-reduce
  (``hf_adahessian.estimate.all_reduce_mean_``) replaced by a no-op;
* ``adahessian_grads_only``: as ``adahessian`` with the all-reduce applied to
  the gradients only, not to the Hessian estimates;
* ``adahessian_i2_ga2_no_allreduce``: as ``adahessian_i2_ga2`` with the no-op.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback  # noqa: E402

import hf_adahessian.estimate as ah_estimate  # noqa: E402
from hf_adahessian import AdaHessianTrainer, AdaHessianTrainingArguments  # noqa: E402

N_SAMPLES = 32
SEQ_LEN = 8
VOCAB = 64
MAX_STEPS = 4

CASES = {
    "adahessian": dict(optim="adahessian", learning_rate=0.05, optim_args="hessian_interval=1", grad_acc=1),
    # Also with find_unused_parameters=False (transformers' default here is True): DDP's
    # reducer then expects every synced backward to reach all parameters, and the
    # Hessian steps run between DDP-synced steps.
    "adahessian_i2_ga2": dict(optim="adahessian", learning_rate=0.05, optim_args="hessian_interval=2", grad_acc=2,
                              find_unused=False),
    "adamw": dict(optim="adamw_torch", learning_rate=1e-3, optim_args=None, grad_acc=1),
    "adahessian_no_allreduce": dict(optim="adahessian", learning_rate=0.05, optim_args="hessian_interval=1",
                                    grad_acc=1, patch="no_allreduce"),
    "adahessian_grads_only": dict(optim="adahessian", learning_rate=0.05, optim_args="hessian_interval=1",
                                  grad_acc=1, patch="grads_only"),
}
CASES["adahessian_i2_ga2_no_allreduce"] = dict(CASES["adahessian_i2_ga2"], patch="no_allreduce")


def make_dataset() -> list[dict[str, torch.Tensor]]:
    """Fixed-length rows (no padding), each with a distinct first token that identifies it."""
    g = torch.Generator().manual_seed(1234)
    rows = []
    for i in range(N_SAMPLES):
        ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=g)
        ids[0] = 2  # [CLS]-like
        ids[1] = 3 + i  # the row's id, read back from each micro-batch
        rows.append({
            "input_ids": ids,
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": torch.tensor(int(ids[2:].sum()) % 2),
        })
    return rows


def make_model() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ_LEN, type_vocab_size=1, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    # BertForSequenceClassification takes **kwargs, so the Trainer would assume its loss
    # is normalised by `num_items_in_batch` (it is a plain batch mean) and, under DDP with
    # average_tokens_across_devices, multiply it by the world size: stock transformers
    # behaviour that would make *every* optimizer differ from the single process.  Saying
    # that the model ignores num_items_in_batch gives the plain-mean semantics everywhere.
    model.accepts_loss_kwargs = False
    return model


class RecordingTrainer(AdaHessianTrainer):
    """Records the rows of each micro-batch (by their id token) on this rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[int]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append([int(r) - 3 for r in inputs["input_ids"][:, 1].tolist()])
        return super().training_step(model, inputs, num_items_in_batch)


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})


def patched_all_reduce(kind: str, model: torch.nn.Module):
    original = ah_estimate.all_reduce_mean_
    if kind == "no_allreduce":
        return lambda tensors: None

    def grads_only(tensors):
        grad_ids = {id(p.grad) for p in model.parameters() if p.grad is not None}
        original([t for t in tensors if id(t) in grad_ids])

    return grads_only


def run_case(name: str, batch: int, out: Path) -> None:
    spec = CASES[name]
    case_dir = out / name
    case_dir.mkdir(parents=True, exist_ok=True)
    model = make_model()
    args = AdaHessianTrainingArguments(
        output_dir=str(case_dir / "trainer"),
        use_cpu=True,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=spec["grad_acc"],
        max_steps=MAX_STEPS,
        optim=spec["optim"],
        optim_args=spec["optim_args"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=spec.get("find_unused"),
    )
    recorder = LogRecorder()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=make_dataset(), callbacks=[recorder])
    rank = args.process_index
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, case_dir / "init.pt")

    original = ah_estimate.all_reduce_mean_
    if "patch" in spec:
        ah_estimate.all_reduce_mean_ = patched_all_reduce(spec["patch"], model)
    try:
        trainer.train()
    finally:
        ah_estimate.all_reduce_mean_ = original

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    dist = torch.distributed
    info = {
        "case": name,
        "rank": rank,
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "device": str(args.device),
        "optimizer": type(optimizer).__name__,
        "global_step": trainer.state.global_step,
        "seen": trainer.seen,
        "logs": recorder.logs,
    }
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({k: v.detach().clone() for k, v in unwrapped.state_dict().items()}, case_dir / f"rank{rank}.pt")
    (case_dir / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch", required=True, type=int, help="per-device train batch size")
    parser.add_argument("--cases", required=True, help=f"comma-separated, of: {', '.join(CASES)}")
    ns = parser.parse_args()
    for name in ns.cases.split(","):
        run_case(name, ns.batch, ns.out)


if __name__ == "__main__":
    main()
