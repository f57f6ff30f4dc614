"""FSDP2: the standalone optimizer on 2 gloo processes, parameters sharded by ``fully_shard``,
trains as one process with twice the batch (finite differences through a closure).

``tests/scripts/fsdp_train.py`` runs the cases under ``torchrun`` and as one plain process.
Probes are drawn whole and sliced to each shard, ε is taken from the norm of the whole θ,
the finiteness checks and the never-seen-rows fallback reduce across the shards, and the
state is sharded like the parameters (DTensors).  Float64 shows the algebra exact up to
round-off amplified by 1/ε (forward: 1e5 in float64, measured 3.7e-9 of the distance trained;
central: 3.4e-11).  Float32 (eps=1e-2) carries the gradient's rounding amplified by 1/ε ≈ 1e3,
as test_distributed.py's finite-difference case (measured 7.0e-3 of the distance).

The Trainer's ``--fsdp`` is not here: accelerate 1.15 enables FSDP only for GPU-type
set-ups (on CPU the Trainer trains with DDP under ``--fsdp``), so the package refuses it.
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

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    cases = ",".join(CASES)
    launches = {
        "fsdp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(SCRIPT),
                 "--out", str(root / "fsdp"), "--batch", "2", "--cases", cases],
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


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_training_matches_one_process_with_twice_the_batch(runs, case):
    got = torch.load(runs / "fsdp" / case / "rank0.pt")
    other = torch.load(runs / "fsdp" / case / "rank1.pt")
    ref, init = torch.load(runs / "ref" / case / "rank0.pt"), torch.load(runs / "ref" / case / "init.pt")
    moved = max((ref[k].double() - init[k].double()).abs().max().item() for k in ref)
    assert moved > 1e-2
    for k in ref:
        torch.testing.assert_close(got[k], other[k], rtol=0, atol=0)  # the gathered parameters agree
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=CASES[case] * moved, msg=lambda m, k=k: f"{case} {k}: {m}")
