"""Data parallelism: 2 processes on CPU (gloo) train exactly as one process with twice the batch.

PyTorch DDP averages gradients from hooks that fire when ``backward()``
accumulates ``.grad``; AdaHessian's Hessian step takes its gradients with
``torch.autograd.grad(create_graph=True)`` inside ``model.no_sync()``, so DDP
averages nothing there and the package all-reduces the gradients and the
Hessian estimates itself (``hf_adahessian.distributed.all_reduce_mean_``).

``tests/scripts/ddp_train.py`` trains a tiny BERT classifier (dropout 0, fixed
init) with ``AdaHessianTrainer`` for 4 optimizer steps, with a sequential
sampler so that accelerate's ``BatchSamplerShard`` gives the 2 ranks (batch B
each) exactly the samples of one process with batch 2B.  One ``torchrun``
launch runs all the distributed cases and one plain ``python`` launch the
single-process references, concurrently.  Checked:

* accelerate really uses DDP with gloo on CPU under torchrun;
* each step's samples across the ranks are the reference's step's samples;
* with the package's all-reduce, parameters are bitwise identical across ranks
  and equal to the single process's to float32 round-off (``adahessian`` with
  hessian_interval 1; interval 2 with gradient_accumulation_steps 2; stock
  ``adamw_torch`` as a control of the set-up itself), and in float64 (interval 2 with
  accumulation 2, finite differences) to float64 round-off: the algebra is exact, what the
  float32 tolerances allow is rounding;
* the check is sensitive: with the all-reduce replaced by a no-op (or applied
  to the gradients only), the ranks drift apart and away from the reference.

Why not bitwise against the single process: the reference averages 2B
per-sample losses in one reduction and multiplies matrices of 2B rows, while
each rank averages B and gloo then sums the two means and halves them.  The
float32 rounding differs (~1e-7 relative), and the optimizers' normalisation
(Adam's √v, AdaHessian's √v of a tiny Hessian) amplifies it on coordinates with
a small denominator, and which coordinates have one depends on the probes: the
largest differences seen here are ~3e-6 on parameters of size ~0.01 and ~5e-6 on
parameters of size ~1, against 1e-3 to 0.1 without the all-reduce.  Hence an
absolute tolerance of 5e-6 beside the relative 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"

WORLD = 2
BATCH = 2  # per rank; the reference uses WORLD * BATCH
MAX_STEPS = 4

TRAINER_CASES = ["adahessian", "adahessian_i2_ga2", "adahessian_i2_ga2_fp64", "adahessian_i2_ga2_ch_fp64",
                 "adahessian_fd", "adahessian_fd_fp64", "adahessian_rare_head", "adahessian_clm", "adamw"]
SYNCED = TRAINER_CASES + ["standalone"]
# Distributed cases with the package's all-reduce sabotaged -> the synced case they should match.
SABOTAGED = {
    "adahessian_no_allreduce": "adahessian",
    "adahessian_grads_only": "adahessian",
    "adahessian_i2_ga2_no_allreduce": "adahessian_i2_ga2",
}
GRAD_ACC = {"adahessian": 1, "adahessian_i2_ga2": 2, "adahessian_i2_ga2_fp64": 2, "adahessian_i2_ga2_ch_fp64": 2,
            "adahessian_fd": 1, "adahessian_fd_fp64": 1, "adahessian_rare_head": 1, "adahessian_clm": 2, "adamw": 1,
            "standalone": 1}
MODEL = {"adahessian_rare_head": "RareHeadBert", "adahessian_clm": "GPT2LMHeadModel"}

# float32 round-off after 4 steps; see the module docstring.
RTOL, ATOL = 1e-5, 5e-6
# Cases whose rounding is amplified more, as (parameters' tolerance as a share of the distance
# trained, relative tolerance of the logged loss and Hessian mean).  A normalisation error (the
# world size or the accumulation steps) would be a factor of 2, far outside either.
# * finite differences (eps=1e-2): the gradients' fp32 rounding (a 2-rank mean and a 2B-row mean round
#   differently) enters the estimate amplified by 1/ε ≈ 1e3, as in test_finite_difference.py's
#   accumulation test (measured: 2.3e-3 of the distance trained, 7.8e-4 of the logged loss; at
#   eps=1e-4, 1.5e-3 of the loss);
# * the causal LM: a sum over masked tokens divided by the global item count, then averaged over
#   ranks, rounds differently from one process's division (measured: 1.2e-4 of the distance).
# The float64 twins (the default eps=1e-4) show that what is left is round-off, not the algebra: the
# accumulation and the all-reduce are exact up to float64 rounding (measured: interval 2 with
# accumulation 2, 4e-14 absolute, 1e-12 of the distance; finite differences, whose 1/ε is 1e5
# in float64, 5e-10 of the distance).
LOOSER = {"adahessian_fd": (5e-3, 1e-3), "adahessian_clm": (5e-4, 1e-4)}
# (The logged loss goes through the Trainer's float32 running sum, hence 1e-6 for the logs.)
TIGHTER = {"adahessian_i2_ga2_fp64": (1e-10, 1e-6), "adahessian_i2_ga2_ch_fp64": (1e-10, 1e-6),
           "adahessian_fd_fp64": (1e-8, 1e-6)}
CASE_TOLERANCE = {**LOOSER, **TIGHTER}
# What "different" means for the sabotaged runs, and how far training must move the parameters.
CLEARLY_DIFFERENT = 1e-3

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Run the torchrun launch and the single-process reference (concurrently); return their folder."""
    root = tmp_path_factory.mktemp("ddp")
    launches = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
                str(SCRIPT), "--out", str(root / "ddp"), "--batch", str(BATCH),
                "--cases", ",".join(SYNCED + list(SABOTAGED))],
        "ref": [sys.executable, str(SCRIPT), "--out", str(root / "ref"), "--batch", str(WORLD * BATCH),
                "--cases", ",".join(SYNCED)],
    }
    procs = {}
    for name, cmd in launches.items():
        log = open(root / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT), log)
    failures = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failures.append(f"{name} exited {rc}:\n{(root / f'{name}.log').read_text()[-6000:]}")
    assert not failures, "\n\n".join(failures)
    return root


def params(runs: Path, run: str, case: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(runs / run / case / f"rank{rank}.pt")


def info(runs: Path, run: str, case: str, rank: int = 0) -> dict:
    return json.loads((runs / run / case / f"rank{rank}.json").read_text())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


def test_torchrun_on_cpu_is_ddp_over_gloo(runs):
    for case in TRAINER_CASES + list(SABOTAGED):
        for rank in range(WORLD):
            got = info(runs, "ddp", case, rank)
            assert got["rank"] == rank and got["world_size"] == WORLD
            assert got["parallel_mode"] == "ParallelMode.DISTRIBUTED"
            assert got["distributed_type"] == "DistributedType.MULTI_CPU"
            assert got["backend"] == "gloo"
            assert got["device"].startswith("cpu")
            assert got["model_wrapped"] == "DistributedDataParallel"
            assert got["optimizer"] == ("AdamW" if case == "adamw" else "AdaHessian")
            assert got["global_step"] == MAX_STEPS
    # The i2_ga2 cases also run with DDP's find_unused_parameters=False (transformers picks True).
    assert info(runs, "ddp", "adahessian", 0)["find_unused_parameters"] is True
    assert info(runs, "ddp", "adahessian_i2_ga2", 0)["find_unused_parameters"] is False
    for case in TRAINER_CASES:
        ref = info(runs, "ref", case)
        assert ref["world_size"] == 1 and ref["parallel_mode"] == "ParallelMode.NOT_PARALLEL"
        assert ref["model_wrapped"] == MODEL.get(case, "BertForSequenceClassification")
        assert ref["global_step"] == MAX_STEPS
    assert info(runs, "ddp", "standalone", 1)["world_size"] == WORLD


def test_the_stock_classifier_is_found_to_ignore_num_items_and_the_causal_lm_to_use_it(runs):
    """The stock BertForSequenceClassification, untouched, takes **kwargs: transformers 5 would scale its
    loss by the world size. The trainer's check finds that its loss ignores the item count; the causal
    LM's loss uses it and keeps the Trainer's handling."""
    for run in ("ddp", "ref"):
        assert info(runs, run, "adahessian", 0)["accepts_loss_kwargs"] is False
        assert info(runs, run, "adahessian_clm", 0)["accepts_loss_kwargs"] is True


@pytest.mark.parametrize("case", SYNCED)
def test_ranks_see_the_single_process_batches(runs, case):
    ref = info(runs, "ref", case)["seen"]
    ranks = [info(runs, "ddp", case, r)["seen"] for r in range(WORLD)]
    assert len(ref) == MAX_STEPS * GRAD_ACC[case]
    assert all(len(seen) == len(ref) for seen in ranks)
    for j, batch in enumerate(ref):
        assert len(batch) == WORLD * BATCH
        # Rank r gets the r-th slice of the reference's micro-batch j (BatchSamplerShard, split_batches=False).
        assert [seen[j] for seen in ranks] == [batch[r * BATCH:(r + 1) * BATCH] for r in range(WORLD)]


@pytest.mark.parametrize("case", SYNCED)
def test_parameters_identical_across_ranks(runs, case):
    p0 = params(runs, "ddp", case, 0)
    for rank in range(1, WORLD):
        pr = params(runs, "ddp", case, rank)
        assert p0.keys() == pr.keys()
        differing = [k for k in p0 if not torch.equal(p0[k], pr[k])]
        assert not differing, f"rank {rank} differs from rank 0 in {differing}"


@pytest.mark.parametrize("case", SYNCED)
def test_parameters_match_single_process_with_twice_the_batch(runs, case):
    got, ref, init = params(runs, "ddp", case), params(runs, "ref", case), torch.load(runs / "ref" / case / "init.pt")
    moved, _ = max_abs_diff(ref, init)
    assert moved > CLEARLY_DIFFERENT, f"training barely moved the parameters ({moved}): the comparison would be vacuous"
    diff, where = max_abs_diff(got, ref)
    rtol, atol = (0.0, CASE_TOLERANCE[case][0] * moved) if case in CASE_TOLERANCE else (RTOL, ATOL)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{case}: {k} differs from the single process "
                                                      f"(max |diff| {diff:.3g} in {where}):\n{m}")


@pytest.mark.parametrize("case", SYNCED)
def test_logged_loss_and_hessian_match_single_process(runs, case):
    ref = info(runs, "ref", case)["logs"]
    for rank in range(WORLD):
        got = info(runs, "ddp", case, rank)["logs"]
        assert len(got) == len(ref) == MAX_STEPS
        for step, (g, r) in enumerate(zip(got, ref), 1):
            rel = CASE_TOLERANCE[case][1] if case in CASE_TOLERANCE else 1e-5
            if case == "standalone":  # a hand-written loop logs each rank's own loss: their mean is the reference's
                other = info(runs, "ddp", case, 1 - rank)["logs"][step - 1]
                assert (g["loss"] + other["loss"]) / 2 == pytest.approx(r["loss"], rel=rel), (case, rank, step)
            else:
                assert g["loss"] == pytest.approx(r["loss"], rel=rel), (case, rank, step)
            if case == "adamw":
                assert "hessian_mean" not in g
            elif case == "standalone":
                assert g["hessian_mean"] == pytest.approx(r["hessian_mean"], rel=1e-5, nan_ok=True)
            else:
                # The averaged estimate is the one the reference makes from the whole batch.
                assert g["hessian_mean"] == pytest.approx(r["hessian_mean"], rel=rel), (case, rank, step)
                assert g["hessian_updates"] == r["hessian_updates"]
    if case in ("adahessian_i2_ga2", "adahessian_i2_ga2_fp64", "standalone"):
        assert [log["hessian_updates"] for log in ref] == [1, 1, 2, 2]


@pytest.mark.parametrize("case", sorted(SABOTAGED))
def test_without_the_package_all_reduce_ranks_diverge(runs, case):
    """DDP does not average the double-backward gradients: sabotage the package's all-reduce and see."""
    ranks = [params(runs, "ddp", case, r) for r in range(WORLD)]
    between_ranks, where = max_abs_diff(ranks[0], ranks[1])
    assert between_ranks > CLEARLY_DIFFERENT, f"{case}: ranks agree ({between_ranks:.3g} in {where})"
    ref = params(runs, "ref", SABOTAGED[case])
    for rank, p in enumerate(ranks):
        from_ref, where = max_abs_diff(p, ref)
        assert from_ref > CLEARLY_DIFFERENT, f"{case}: rank {rank} matches the reference ({from_ref:.3g} in {where})"
    if case == "adahessian_grads_only":
        # Gradients averaged but Hessian estimates not: each rank logs its own, different, Hessian.
        logs = [info(runs, "ddp", case, r)["logs"] for r in range(WORLD)]
        assert logs[0][0]["hessian_mean"] != pytest.approx(logs[1][0]["hessian_mean"], rel=1e-3)
