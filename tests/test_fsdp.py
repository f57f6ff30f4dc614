"""FSDP2: the standalone optimizer on 2 gloo processes, parameters sharded by ``fully_shard``,
trains as one process with twice the batch (finite differences through a closure).

``tests/scripts/fsdp_train.py`` runs the cases under ``torchrun`` and as one plain process.
Probes are drawn whole and sliced to each shard, ε is taken from the norm of the whole θ,
the finiteness checks and the never-seen-rows fallback reduce across the shards, and the
state is sharded like the parameters (DTensors).  Float64 shows the algebra exact up to
round-off amplified by 1/ε (forward: 1e5 in float64, measured 3.7e-9 of the distance trained;
central: 3.4e-11).  Float32 (eps=1e-2) carries the gradient's rounding amplified by 1/ε ≈ 1e3,
as test_distributed.py's finite-difference case (measured 7.0e-3 of the distance).

The Trainer's ``--fsdp`` (FSDP2 through accelerate, which the script lets run on CPU) trains
as one process too: stock AdamW as a control of the set-up, then AdaHessian by finite
differences with accumulation, the stale guard, and a resume from a sharded checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_distributed import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "fsdp_train.py"
# case -> parameters' tolerance as a share of the distance trained
CASES = {"loop_fd_fp64": 1e-7, "loop_fd_central_fp64": 1e-9, "loop_fd": 2e-2}
# The Trainer's --fsdp, same tolerances (measured: float64 2.7e-10 to 1.7e-9; float32 by forward differences
# at eps=1e-2 1.6e-3).  Stock AdamW in float32 is the set-up's control, not a check of the algebra (its float64
# twin is, at 1e-9): m/(√v + 1e-8) turns the float32 rounding of a reduce-scatter against one process's sum
# into a relative error of the step where a gradient is small, and how much depends on the CPU's kernels
# (2.4e-6 of the distance on one machine, 3.4e-5 on another, in one position-embedding entry).
TRAINER_CASES = {"trainer_adamw": 1e-4, "trainer_adamw_ga2_fp64": 1e-9, "trainer_fd_fp64": 1e-7,
                 "trainer_fd_i2_ga2_fp64": 1e-7, "trainer_fd_i2_sg_fp64": 1e-7, "trainer_fd_i2_sga_fp64": 1e-7,
                 "trainer_fd_i2_sga_ch_fp64": 1e-7, "trainer_fd": 2e-2}
RESUMES = ("trainer_fd_resume_fp64", "trainer_fd_resume_sga_fp64")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    cases = ",".join([*CASES, *TRAINER_CASES])
    launches = {
        "fsdp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(SCRIPT),
                 "--out", str(root / "fsdp"), "--batch", "2", "--cases", ",".join([cases, *RESUMES])],
        "ref": [sys.executable, str(SCRIPT), "--out", str(root / "ref"), "--batch", "4", "--cases", cases],
    }
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, cmd in launches.items()}
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{name} exited {proc.returncode}:\n{out[-6000:]}")
    assert not failures, "\n\n".join(failures)
    return root


def test_parameters_and_state_are_sharded(runs):
    for case in CASES:
        for rank in range(2):
            info = json.loads((runs / "fsdp" / case / f"rank{rank}.json").read_text())
            assert info["sharded_params"] == info["params"] and info["sharded_state"]
            assert info["local_numel"] < info["numel"]


@pytest.mark.parametrize("case", [*CASES, *TRAINER_CASES])
def test_sharded_training_matches_one_process_with_twice_the_batch(runs, case):
    tolerance = {**CASES, **TRAINER_CASES}[case]
    got = torch.load(runs / "fsdp" / case / "rank0.pt")
    other = torch.load(runs / "fsdp" / case / "rank1.pt")
    ref, init = torch.load(runs / "ref" / case / "rank0.pt"), torch.load(runs / "ref" / case / "init.pt")
    moved = max((ref[k].double() - init[k].double()).abs().max().item() for k in ref)
    assert moved > 1e-3  # training moved the parameters (AdamW at lr 1e-3: 4e-3 in 4 steps)
    for k in ref:
        torch.testing.assert_close(got[k], other[k], rtol=0, atol=0)  # the gathered parameters agree
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=tolerance * moved, msg=lambda m, k=k: f"{case} {k}: {m}")


@pytest.mark.parametrize("case", [*TRAINER_CASES, *RESUMES])
def test_the_trainer_shards_through_accelerates_fsdp2(runs, case):
    for rank in range(2):
        info = json.loads((runs / "fsdp" / case / f"rank{rank}.json").read_text())
        assert info["distributed_type"] == "DistributedType.FSDP" and info["model_wrapped"].startswith("FSDP")
        assert info["sharded_params"] == info["params"]
        assert info["global_step"] == 4
    if "adamw" not in case:
        assert info["optimizer"] == "AdaHessian" and info["logs"][-1]["hessian_updates"] >= 2


@pytest.mark.parametrize("case", RESUMES)
def test_a_sharded_run_resumes_bit_for_bit(runs, case):
    whole = torch.load(runs / "fsdp" / case / "rank0.pt")
    resumed = torch.load(runs / "fsdp" / f"{case}_resumed" / "rank0.pt")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    logs = [json.loads((runs / "fsdp" / name / "rank0.json").read_text())["logs"]
            for name in (case, f"{case}_resumed")]
    assert [log["loss"] for log in logs[1]] == [log["loss"] for log in logs[0][2:]]
    assert logs[1][-1]["hessian_updates"] == logs[0][-1]["hessian_updates"]
