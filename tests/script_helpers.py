"""What the two example-script test files share: the child environment, small file helpers, checks."""

import json
import os
from pathlib import Path

import pytest


def adahessian(optim_args="hessian_interval=1,block_size=1"):
    return ["--optim", "adahessian", "--learning_rate", "0.05", "--optim_args", optim_args]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets_cache")),
        # Tiny models: one thread each is as fast and lets runs overlap on two cores.
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _train_logs(output_dir):
    return [h for h in _json(Path(output_dir) / "trainer_state.json")["log_history"] if "loss" in h]


def _assert_usage_error(returncode, stderr, words):
    assert "Traceback" not in stderr, stderr[-3000:]
    assert returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for word in words:
        assert word in last, (word, last)


# Runs the script's __main__ once per case in one interpreter; records the exit status and what went to stderr.
RUN_EACH = """
import contextlib, io, json, runpy, sys, traceback
script, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
results = {}
for name, argv in cases.items():
    sys.argv = [script, *argv]
    err, code = io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code, _ = "exception", traceback.print_exc(file=err)
    results[name] = [code, err.getvalue()]
with open(out, "w") as f:
    json.dump(results, f)
"""
