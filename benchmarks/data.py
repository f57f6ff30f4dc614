"""The shared data the benchmarks read (../shared/data), and quick mode's slices of it.

The data stay beside the project and are never copied into it: quick mode cuts
its slices into a temporary folder, removed when the parent exits, together with
a ``datasets`` cache of its own that the caller hands to the children's
environment (``machine.child_env``); nothing here sets ``os.environ``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .specs import Budget


def require_data(data_dir: Path, name: str, files=("train.jsonl", "validation.jsonl")) -> Path:
    """``data_dir/name``, or exit 0 with a clear reason when it is absent (as the tests skip)."""
    folder = Path(data_dir) / name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        print(f"SKIPPED: {folder} lacks {', '.join(missing)}; the benchmarks read the shared data "
              f"(../shared/data, or --data_dir).", flush=True)
        raise SystemExit(0)
    return folder


@dataclass(frozen=True)
class DataFiles:
    train: Path
    validation: Path
    datasets_cache: Path | None  # None: the children keep the inherited datasets cache


def data_files(folder: Path, budget: Budget, quick: bool) -> DataFiles:
    """The training and validation files the runs read: in quick mode, slices cut on disk
    (no tokenizing of the whole set per run), with a datasets cache of their own."""
    train, valid = folder / "train.jsonl", folder / "validation.jsonl"
    if not quick:
        return DataFiles(train, valid, None)
    tmp = temporary_folder()
    return DataFiles(write_slice(train, tmp / "train.jsonl", budget.train_samples),
                     write_slice(valid, tmp / "validation.jsonl", budget.eval_samples),
                     tmp / "datasets_cache")


def write_slice(src: Path, dst: Path, n: int | None) -> Path:
    """The first ``n`` lines of a JSON-lines file (all of them for None)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if n is not None and i >= n:
                break
            g.write(line)
    return dst


def temporary_folder() -> Path:
    """A temporary folder, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="hf-adahessian-bench-data-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
