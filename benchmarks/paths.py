"""Where the benchmarks read and write, and how a recorded path stays portable.

Results live in ``benchmarks/results/<benchmark>/<kind>/`` (kind: ``comparison``,
``lr_search``, ``profile``, ``memory``); ``benchmarks/results/INDEX.md`` says what
each folder holds. Every child runs with the repository root as its working
directory, so the paths on its command line are repository-relative wherever the
file is inside the repository. What is recorded goes through :func:`portable`: the
interpreter becomes ``python``, the repository's absolute path disappears (paths
relative to its root), the folder above it becomes ``..`` (the shared data are
``../shared/data``), site-packages ``<site-packages>`` and the temporary folder
``<tmp>``, so a results.json reads the same whichever machine made it.
"""

from __future__ import annotations

import os
import re
import site
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
RESULTS = HERE / "results"


def results_dir(benchmark: str, kind: str) -> Path:
    """``benchmarks/results/<benchmark>/<kind>/``: where a run that is not quick writes by default."""
    return RESULTS / benchmark / kind


def arg_path(path: Path | str) -> str:
    """A path for a child's command line: relative to the repository root when it is inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _prefixes() -> list[tuple[str, str]]:
    """(absolute prefix, replacement), most specific first."""
    pairs = [(sys.executable, "python"), (os.path.realpath(sys.executable), "python")]
    pairs += [(p, "<site-packages>") for p in site.getsitepackages() + [site.getusersitepackages()]]
    pairs += [(str(REPO) + os.sep, ""), (str(REPO), "."), (str(REPO.parent) + os.sep, ".." + os.sep)]
    pairs += [(tempfile.gettempdir(), "<tmp>")]
    return sorted({p: r for p, r in pairs if p and p != os.sep}.items(), key=lambda pr: -len(pr[0]))


_PATTERN: re.Pattern | None = None
_REPLACEMENT: dict[str, str] = {}


def portable_text(text: str) -> str:
    """``text`` with this machine's absolute paths replaced (see the module docstring)."""
    global _PATTERN
    if _PATTERN is None:
        prefixes = _prefixes()
        _REPLACEMENT.update(prefixes)
        # A prefix counts only where a path starts: not inside another word or path.
        _PATTERN = re.compile(r"(?<![\w./~-])(" + "|".join(re.escape(p) for p, _ in prefixes) + ")")
    return _PATTERN.sub(lambda m: _REPLACEMENT[m.group(1)], text)


def portable(obj):
    """Every string in a JSON-like object through :func:`portable_text` (keys too); numbers untouched."""
    if isinstance(obj, str):
        return portable_text(obj)
    if isinstance(obj, Path):
        return portable_text(str(obj))
    if isinstance(obj, dict):
        return {portable(k): portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj
