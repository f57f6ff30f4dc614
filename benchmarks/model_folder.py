"""The model folder of a from-scratch benchmark, made at the start of every invocation.

The package's own command builds it (``python -m hf_adahessian.examples.models``: config,
random weights under seed 0, a tokenizer trained on the training file), so every optimizer
and seed of the invocation starts from the same weights; rebuilt every time (about 15 s,
deterministic, never stale), into ``runs/model`` of the output folder (git-ignored).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .paths import REPO, arg_path


def build_model(out_dir: Path, env: dict, model_type: str, train_file: Path,
                *extra: str) -> tuple[Path, list[str], float]:
    """``--size small`` of ``model_type``; ``extra``: more of the command's flags. The folder, the command, seconds."""
    model = out_dir / "runs" / "model"
    shutil.rmtree(model, ignore_errors=True)
    cmd = [sys.executable, "-m", "hf_adahessian.examples.models", "--model_type", model_type, "--size", "small",
           "--train_file", arg_path(train_file), "--output_dir", arg_path(model), "--seed", "0", *extra]
    print(f"building the model folder: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return model, cmd, time.perf_counter() - start
