"""A small GPT-2 trained from scratch on the English side of Multi30k: AdamW against AdaHessian, perplexity.

    python -m benchmarks.lm --quick                         # CI smoke run
    python -m benchmarks.lm                                 # the comparison (see BENCHMARKS.md for budgets)
    python -m benchmarks.lm --seeds 42,43,44 --eval_every 25
    python -m benchmarks.lm --lr_grid                       # learning-rate search on the search budget

The model folder is made at the start of every invocation by the package's own command,
``python -m hf_adahessian.examples.models --model_type gpt2 --size small --text_columns
translation.en --train_file ...`` (4 layers, hidden 256, 4 heads, ffn 1,024, a byte-level BPE
vocabulary of 8,000 trained on the English side of the whole training split, tied input and
output embeddings, seed 0), and every optimizer and seed starts from those same weights.
Training goes through ``run_clm.py``: the English sentences (``--text_column translation.en``)
tokenized, concatenated and cut into blocks of 64 tokens, batch 32. The metric is perplexity on
the validation split's English side, exp of the evaluation's mean token loss (lower is better).
The peers can be picked with ``--optimizers`` too.
"""

from __future__ import annotations

from . import comparison, specs
from .model_folder import build_model
from .paths import arg_path
from .specs import Budget, Budgets, Experiment, Metric

MODULE = "benchmarks.lm"  # how it is run: python -m MODULE
NAME = "lm"  # results: benchmarks/results/lm/<kind>/
DATA = "multi30k"  # ../shared/data/multi30k/{train,validation}.jsonl, English side
BLOCK_SIZE, BATCH_SIZE = 64, 32
# run_clm.py's evaluate() reports eval_loss (and eval_accuracy, next-token); perplexity is exp(eval_loss).
METRIC = Metric("eval_loss", "perplexity", higher_is_better=False, format=".2f", transform="exp", log_scale=True)
HESSIAN_GRID = (0.01, 0.03, 0.1, 0.15, 0.3, 0.6)
SOPHIA_GRID = (0.01, 0.03, 0.06, 0.1)
# Learning rates: each its own search's on this benchmark (results/lm/lr_search*/, the comparison at them in
# results/lm/comparison_searched/): AdamW 2e-3 of 5e-4..3e-3, AdaHessian (blocks of 32, as in multi30k.py) 0.3
# of 0.01..0.6, the rows that follow it included (forward differences on 1/16 searched 0.3 and 0.6 on its own).
OPTIMIZERS = specs.from_scratch_registry(2e-3, (5e-4, 1e-3, 2e-3, 3e-3), 0.3, HESSIAN_GRID, 0.06, SOPHIA_GRID)
DEFAULT = specs.FROM_SCRATCH_DEFAULT

# Optimizer steps (batch 32 blocks of 64 tokens), training texts (None: all 29,000 English sentences,
# 392k tokens, 6,132 blocks: 192 steps an epoch), validation texts (None: all 1,014, 14k tokens, 218 blocks).
# Full: 300 steps (1.6 epochs), a few minutes of AdamW on 2 cores (BENCHMARKS.md, "Budgets"); search: half.
BUDGETS = Budgets(
    quick=Budget(max_steps=4, train_samples=256, eval_samples=64, warmup_skip=1),
    full=Budget(max_steps=300, train_samples=None, eval_samples=None, warmup_skip=20),
    search=Budget(max_steps=150, train_samples=None, eval_samples=None, warmup_skip=10),
)


def main() -> None:
    start = comparison.setup(MODULE, __doc__, OPTIMIZERS, DEFAULT, BUDGETS, NAME, data_name=DATA)
    data = start.data
    batch = start.args.batch_size or BATCH_SIZE
    # The vocabulary is trained on the English side of the whole training split, whatever the slice.
    model, build_cmd, build_s = build_model(start.out_dir, start.env, "gpt2", start.folder / "train.jsonl",
                                            "--text_columns", "translation.en")
    experiment = Experiment(
        name=NAME, title="GPT-2-small from scratch on Multi30k (en)", script="run_clm.py", metric=METRIC,
        budgets=BUDGETS,
        script_args=(
            "--model_name_or_path", arg_path(model), "--text_column", "translation.en",
            "--train_file", arg_path(data.train), "--validation_file", arg_path(data.validation),
            "--do_train", "--do_eval", "--block_size", str(BLOCK_SIZE),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "64",
        ),
    )
    comparison.run_comparison(
        experiment, start, MODULE,
        extra_meta={"model_build_command": build_cmd, "model_build_s": build_s, "batch_size": batch,
                    "block_size": BLOCK_SIZE, "text_column": "translation.en"},
    )


if __name__ == "__main__":
    main()
