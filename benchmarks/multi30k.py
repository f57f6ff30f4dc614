"""A small Marian transformer trained from scratch on Multi30k de->en: AdamW against AdaHessian.

    python benchmarks/multi30k.py --quick                 # CI smoke run
    python benchmarks/multi30k.py                         # the comparison (see BENCHMARKS.md for budgets)
    python benchmarks/multi30k.py --lr_grid               # learning-rate search on the search budget

The model folder is made at the start of every invocation by the package's own command,
``python -m hf_adahessian.examples.models --model_type marian --size small --train_file ...``
(3+3 layers, d_model 256, a Unigram vocabulary of 8,000 trained on both languages, seed 0),
and every optimizer starts from those same weights. Training goes through
``run_translation.py``; BLEU is sacreBLEU on the validation split, greedy decoding
(``--predict_with_generate``). The peers can be picked with ``--optimizers`` too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "multi30k"
HESSIAN_GRID = [0.01, 0.03, 0.1, 0.15, 0.3]
# Learning rates: the comparison's (from the short search in BENCHMARKS.md) and each optimizer's grid.
OPTIMIZERS = {
    "adamw_torch": {**common.trainer_optimizer(None), "lr": 5e-4, "grid": [2e-4, 5e-4, 1e-3]},
    "adahessian_h1": {**common.trainer_optimizer(1), "lr": 0.03, "grid": HESSIAN_GRID},
    "adahessian_h10": {**common.trainer_optimizer(10), "lr": 0.03, "grid": HESSIAN_GRID},
    "torch_optimizer_adahessian": {"loop": common.PEERS["torch_optimizer_adahessian"], "lr": 0.03,
                                   "grid": HESSIAN_GRID},
    "pytorch_optimizer_adahessian": {"loop": common.PEERS["pytorch_optimizer_adahessian"], "lr": 0.03,
                                     "grid": HESSIAN_GRID},
    "sophiah_h1": {"loop": common.PEERS["sophiah_h1"], "lr": 0.06, "grid": [0.01, 0.03, 0.06, 0.1]},
    "sophiah_h10": {"loop": common.PEERS["sophiah_h10"], "lr": 0.06, "grid": [0.01, 0.03, 0.06, 0.1]},
    "adahessian_loop_h1": {"loop": common.PEERS["adahessian_loop_h1"], "lr": 0.03, "grid": HESSIAN_GRID},
}
DEFAULT = ["adamw_torch", "adahessian_h1", "adahessian_h10"]

# Optimizer steps (batch 32), training pairs (None: all 29,000), validation pairs (1,014 in all).
BUDGETS = {
    "quick": {"max_steps": 4, "train_samples": 256, "eval_samples": 32, "warmup_skip": 1},
    "full": {"max_steps": 800, "train_samples": None, "eval_samples": None, "warmup_skip": 20},
    "search": {"max_steps": 300, "train_samples": None, "eval_samples": 300, "warmup_skip": 10},
}


def build_model(out_dir: Path, data: Path, env: dict) -> tuple[Path, list[str], float]:
    """The package's own model-folder command (rebuilt every time: ~15 s, deterministic, never stale)."""
    model = out_dir / "runs" / "model"  # runs/ is git-ignored
    shutil.rmtree(model, ignore_errors=True)
    cmd = [sys.executable, "-m", "hf_adahessian.examples.models", "--model_type", "marian", "--size", "small",
           "--train_file", str(data / "train.jsonl"), "--output_dir", str(model), "--seed", "0"]
    print(f"building the model folder: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=common.REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return model, cmd, time.perf_counter() - start


def main() -> None:
    parser = common.base_parser(__doc__, list(OPTIMIZERS), DEFAULT)
    args = parser.parse_args()
    budget = common.resolve_budget(args, BUDGETS)
    out_dir = common.default_out_dir(args, NAME)
    data = common.require_data(args.data_dir, "multi30k")
    model, build_cmd, build_s = build_model(out_dir, data, common.bench_env(args.threads))
    train, valid = common.data_files(args, data, budget)
    warmup = max(1, round(0.1 * budget["max_steps"]))

    def script_args(run_dir: Path) -> list[str]:
        a = [
            "--model_name_or_path", str(model), "--source_lang", "de", "--target_lang", "en",
            "--train_file", str(train), "--validation_file", str(valid),
            "--do_train", "--do_eval", "--predict_with_generate",
            "--max_source_length", "64", "--max_target_length", "64", "--generation_max_length", "64",
            "--num_beams", "1", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
        ]
        return a + common.schedule_args(args, budget, warmup, run_dir)

    common.run_experiment(
        "Marian-small on Multi30k de-en", "run_translation.py", args, OPTIMIZERS, budget, script_args,
        metric_key="eval_bleu", metric="bleu", metric_label="BLEU", out_dir=out_dir,
        extra_meta={"model_build_command": build_cmd, "model_build_s": build_s, "batch_size": 32,
                    "max_length": 64, "warmup_steps": warmup, "decoding": "greedy"},
    )


if __name__ == "__main__":
    main()
