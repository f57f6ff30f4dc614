"""The machine a benchmark ran on, the library versions, the git commit; the children's environment."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

from .paths import REPO


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads_per_run": threads,
        "load_average_at_start": os.getloadavg(),
        "memory_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def git_state() -> dict:
    """``git rev-parse HEAD`` and whether tracked files differ from it (untracked files do not count)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def child_env(threads: int, datasets_cache: str | None = None) -> dict:
    """The same thread settings and offline switches for every child process.

    ``datasets_cache``: where the children's ``datasets`` cache goes (quick mode's
    temporary one); None leaves the inherited setting.
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        BENCH_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    if datasets_cache is not None:
        env["HF_DATASETS_CACHE"] = str(datasets_cache)
    return env
