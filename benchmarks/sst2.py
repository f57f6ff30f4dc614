"""MiniLM (pretrained BERT, 22M parameters) fine-tuned on SST-2: AdamW, AdaHessian and its peers.

    python -m benchmarks.sst2 --quick                       # CI smoke run: every default optimizer, a few steps
    python -m benchmarks.sst2                               # the comparison (see BENCHMARKS.md for budgets)
    python -m benchmarks.sst2 --seeds 42,43,44 --eval_every 10   # over three seeds, with time to quality
    python -m benchmarks.sst2 --lr_grid                     # learning-rate search on the search budget
    python -m benchmarks.sst2 --optimizers adamw_torch,adahessian_h1 --lr adahessian_h1=0.03

Trainer optimizers (``adamw_torch``, ``adahessian_h*``) train through ``run_glue.py``; the
peers train in a plain PyTorch loop fed by the same Trainer dataloader (same tokenization,
same order), with the same linear schedule, warm-up and clipping (see ``plain_loop.py``).
Every run: task sst2, ``--max_seq_length 64`` (padded), batch 16 (``--batch_size``), ``--seed`` = ``--data_seed``.
"""

from __future__ import annotations

from hf_adahessian.examples.demo import minilm_folder

from . import comparison, specs
from .paths import arg_path
from .specs import Budget, Budgets, Experiment, Metric

MODULE = "benchmarks.sst2"  # how it is run: python -m MODULE
NAME = "sst2"
METRIC = Metric("eval_accuracy", "accuracy", higher_is_better=True, format=".4f")
BATCH_SIZE = 16

# AdamW as adamw_torch is the baseline; adamw_torch_fused, transformers 5's default --optim, is the same
# update in one kernel, there to check that the baseline's price is the one a user gets without the flag.
# Learning rates: the comparison's (each the best of its grid in the short search, BENCHMARKS.md).
# The AdaHessian rows use the fine-tuning recipe that search found: hessian_power 1, no block
# averaging (block_size=1), lr 0.03; the authors' transformer recipe (block_size=32) is a variant.
HESSIAN_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
POWER_GRID = (1e-2, 3e-2, 0.15, 0.3)
# The fine-tuning recipe at AdamW's price (README), a row of its own and the base of its β2 variants.
CLIP_HESSIAN_H20 = specs.adahessian(20, 1e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True,
                                    stale_guard_reference="average", clip_hessian=True,
                                    hessian_estimator="finite_difference",
                                    note="lr 0.01 chosen at the full budget over the search's 0.03")
OPTIMIZERS = specs.registry(
    *(specs.adamw(1e-4, (2e-5, 5e-5, 1e-4, 2e-4), optim=optim) for optim in ("adamw_torch", "adamw_torch_fused")),
    specs.adahessian(1, 3e-2, HESSIAN_GRID),
    # A Hessian every 10 steps needs a smaller lr than every step: 0.03 diverged in the search.
    specs.adahessian(10, 1e-2, HESSIAN_GRID),
    # A Hessian on every step, estimated on a quarter of each batch.
    specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_batch_fraction=0.25),
    # The other Hessian power of the authors' recipes (update m̂ / (v̂^(1/4) + eps)), with and without blocks.
    specs.adahessian(1, 0.3, POWER_GRID, hessian_power=0.5, block_size=32),
    specs.adahessian(1, 0.15, (3e-2, 0.15, 0.3), hessian_power=0.5),
    # The authors' transformer recipe: |D| averaged over blocks of 32 along the last dimension.
    specs.adahessian(1, 3e-2, HESSIAN_GRID, block_size=32),
    # Hz by finite differences of two ordinary gradients (no double backward); lr not searched yet.
    specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_estimator="finite_difference",
                     note="lr not searched: adahessian_h1's"),
    # The Hessian on one row of the 16 every step: exact, and by forward differences (1/16 of a
    # pass more than a plain step), fresh curvature for a few percent of a step.
    specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_batch_fraction=0.0625, note="lr not searched: adahessian_h1's"),
    specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_batch_fraction=0.0625, hessian_estimator="finite_difference",
                     note="lr not searched: adahessian_h1's"),
    # The exact full-batch estimate in four chunks: the estimate of adahessian_h1, in less memory.
    *(specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_chunks=chunks, note="adahessian_h1's estimate, in chunks")
      for chunks in (2, 4, 8, 16)),
    # ... and as the trainer chooses by default (hessian_chunks=auto: 4 chunks for this head at batch 16).
    specs.adahessian(1, 3e-2, HESSIAN_GRID, hessian_chunks=None, note="adahessian_h1's estimate, chunks by default"),
    # The lazy levers at the fine-tuning recipe's lr (measured in BENCHMARKS.md, "Lazy Hessians").
    specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, note="the recipe's lr"),
    specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, note="the recipe's lr"),
    specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, time_weighted=True, note="the recipe's lr"),
    # The same on 1/16 of each batch by forward differences: AdamW's memory, a few percent of its time.
    specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, hessian_batch_fraction=0.0625,
                     hessian_estimator="finite_difference", note="the recipe's lr"),
    specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, time_weighted=True, hessian_batch_fraction=0.0625,
                     hessian_estimator="finite_difference", note="the recipe's lr"),
    # ... and on a quarter of the batch and on all of it: an estimate that sees more of the batch.
    *(specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, hessian_batch_fraction=fraction,
                       hessian_estimator="finite_difference", note="the recipe's lr")
      for fraction in (0.25, 1.0)),
    # The whole-batch forward differences with a shorter warm-up, or none: the stale guard alone.
    *(specs.adahessian(10, 3e-2, HESSIAN_GRID, hessian_warmup=warmup, stale_guard=True,
                       hessian_estimator="finite_difference", note="the recipe's lr")
      for warmup in (0, 5)),
    # The whole-batch forward differences every 20 steps, after 15 or 10 dense ones, and the from-scratch
    # recipe's schedule as it is (blocks of 32): one setting for both tasks at AdamW's price.
    *(specs.adahessian(20, 3e-2, HESSIAN_GRID, hessian_warmup=warmup, stale_guard=True,
                       hessian_estimator="finite_difference", note="the recipe's lr")
      for warmup in (10, 15)),
    specs.adahessian(20, 3e-2, HESSIAN_GRID, block_size=32, hessian_warmup=15, stale_guard=True,
                     hessian_estimator="finite_difference", note="the recipe's lr"),
    # The every-20 schedule with the guard's average reference: the lazy v̂ where a Hessian on every step has it.
    specs.adahessian(20, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, stale_guard_reference="average",
                     hessian_estimator="finite_difference", note="the recipe's lr"),
    # ... and with the authors' other power (m̂ / (v̂^(1/4) + eps)), which tempers a small or noisy estimate.
    specs.adahessian(20, 0.15, POWER_GRID, hessian_power=0.5, hessian_warmup=15, stale_guard=True,
                     stale_guard_reference="average", hessian_estimator="finite_difference",
                     note="lr not searched: adahessian_h1_p05's"),
    # ... and with the coordinates of little curvature bounded: a larger eps (their step tends to lr·m̂/eps),
    # or m̂/denominator clipped (Sophia's bound); and with v weighting each estimate by the steps it stands for.
    *(specs.adahessian(20, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, stale_guard_reference="average",
                       hessian_estimator="finite_difference", note="the recipe's lr", **bound)
      for bound in ({"eps": 1e-3}, {"eps": 1e-2}, {"update_clip": 1.0}, {"time_weighted": True})),
    # ... and with the estimate clipped by the factor --max_grad_norm clips the gradient by: clipping (the
    # gradient's norm is 2-20 after the warm-up here) then no longer lowers AdaHessian's learning rate.
    CLIP_HESSIAN_H20,
    # ... with fewer dense steps first: under the stale guard's average reference and clip_hessian, does the
    # fresh head still need 15 of them (each a Hessian step at twice a plain step's price)?
    *(specs.adahessian(20, 1e-2, HESSIAN_GRID, hessian_warmup=warmup, stale_guard=True,
                       stale_guard_reference="average", clip_hessian=True, hessian_estimator="finite_difference",
                       note="the recipe's lr") for warmup in (5, 10)),
    # ... or the 15 warm-up steps with a Hessian on every third (steps 0, 3, …, 12): 5 warm-up estimates, as
    # with 5 dense steps, spread over the head's growth instead of its first five steps. Its lr is its own
    # search's at the full budget on seeds 42-44 (results/sst2/warmup_interval_lr/; 0.01 until then).
    specs.adahessian(20, 7e-3, (5e-3, 7e-3, 1e-2, 1.5e-2), hessian_warmup=15, hessian_warmup_interval=3,
                     stale_guard=True, stale_guard_reference="average", clip_hessian=True,
                     hessian_estimator="finite_difference", note="lr searched at the full budget"),
    # ... with its Hessian steps' differences on a quarter of each batch (central, on 4 of 16 rows): a Hessian
    # step at 1.5 plain passes where the whole batch's forward difference is 2. Measured worse beyond noise
    # (results/sst2/warmup_interval_quarter/: 1.7 points under AdamW at 1.08× its time).
    specs.adahessian(20, 7e-3, (5e-3, 7e-3, 1e-2), hessian_warmup=15, hessian_warmup_interval=3,
                     hessian_batch_fraction=0.25, stale_guard=True, stale_guard_reference="average",
                     clip_hessian=True, hessian_estimator="finite_difference", note="the whole batch's lr"),
    # ... every 10 steps: twice the estimates of the encoder's curvature (the same accuracy, measured).
    specs.adahessian(10, 1e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, stale_guard_reference="average",
                     clip_hessian=True, hessian_estimator="finite_difference", note="the every-20 row's lr"),
    specs.adahessian(1, 1e-2, HESSIAN_GRID, clip_hessian=True, hessian_estimator="finite_difference",
                     note="the lazy row's full-budget lr"),
    # ... and with v forgetting the early estimates (β2 per estimate: 0.95 keeps about the last 20 of them).
    *(specs.with_beta2(CLIP_HESSIAN_H20, beta2, note="the every-20 row's lr") for beta2 in (0.99, 0.95, 0.9)),
    # More probes on the lazy Hessian steps, whose cost the interval amortises (the exact estimator:
    # forward differences take one probe), against the same schedule with one.
    *(specs.adahessian(20, 3e-2, HESSIAN_GRID, hessian_warmup=15, stale_guard=True, n_samples=n,
                       note="the recipe's lr") for n in (1, 4)),
    # LoRA (r 8 on query and value, the head trained in full): the time and memory of a Hessian through a
    # frozen base. Adapters take larger steps than full fine-tuning: AdamW's 3e-3 and the 1/16 row's 0.3 are
    # their own searches' (results/sst2/lora_lr_search*/).
    specs.lora(specs.adamw(1e-4, ()), 3e-3, (3e-4, 1e-3, 3e-3, 1e-2)),
    specs.lora(specs.adahessian(1, 3e-2, ()), 3e-2, HESSIAN_GRID, note="lr not searched: adahessian_h1's"),
    specs.lora(specs.adahessian(1, 3e-2, (), hessian_batch_fraction=0.0625, hessian_estimator="finite_difference"),
               0.3, (0.1, 0.3, 1.0)),
    specs.torch_optimizer_adahessian(0.15, POWER_GRID),
    specs.pytorch_optimizer_adahessian(3e-2, (3e-3, 1e-2, 3e-2, 0.1)),
    specs.sophiah(1, 1e-2, (3e-3, 1e-2, 3e-2)),
    specs.sophiah(10, 1e-2, (3e-3, 1e-2, 3e-2)),
    # This package's AdaHessian in the peers' plain loop, with adahessian_h1's settings.
    specs.adahessian_loop(1, 3e-2, HESSIAN_GRID),
)
DEFAULT = ("adamw_torch", "adahessian_h1", "adahessian_h10", "adahessian_h1_f25", "adahessian_h1_p05_b32",
           "torch_optimizer_adahessian", "pytorch_optimizer_adahessian", "sophiah_h1", "sophiah_h10")

# Optimizer steps, training examples (None: all 67,349, sampled at random), dev examples (872 in all).
BUDGETS = Budgets(
    quick=Budget(max_steps=4, train_samples=256, eval_samples=64, warmup_skip=1),
    full=Budget(max_steps=150, train_samples=None, eval_samples=None, warmup_skip=10),
    search=Budget(max_steps=60, train_samples=None, eval_samples=None, warmup_skip=5),
)


def main() -> None:
    start = comparison.setup(MODULE, __doc__, OPTIMIZERS, DEFAULT, BUDGETS, NAME)
    data = start.data
    model = minilm_folder()
    batch = start.args.batch_size or BATCH_SIZE
    experiment = Experiment(
        name=NAME, title="MiniLM on SST-2", script="run_glue.py", metric=METRIC, budgets=BUDGETS,
        script_args=(
            "--model_name_or_path", model, "--task_name", "sst2",
            "--train_file", arg_path(data.train), "--validation_file", arg_path(data.validation),
            "--do_train", "--do_eval",
            "--max_seq_length", "64", "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "64",
        ),
    )
    comparison.run_comparison(
        experiment, start, MODULE,
        extra_meta={"model": model, "batch_size": batch, "max_seq_length": 64},
    )


if __name__ == "__main__":
    main()
