"""Command-line options of the benchmarks: the comparisons' and the step profiles'; budgets; the output folder."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from .paths import DATA, results_dir
from .specs import Budget, Budgets

ESTIMATORS = ("exact", "finite_difference")


def _common(p: argparse.ArgumentParser, quick_help: str) -> None:
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch threads (default: %(default)s)")
    p.add_argument("--output_dir", type=Path,
                   help="where table.md, results.json and the plots go (default: benchmarks/results/<benchmark>/"
                        "<kind>/; with --quick a fresh temporary folder, printed)")
    p.add_argument("--data_dir", type=Path, default=DATA, help="the shared data folder (default: ../shared/data)")


def comparison_parser(module: str, description: str, optimizers: list[str],
                      default_optimizers: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "a few steps on small slices (CI smoke run), written to a temporary folder")
    p.add_argument("--optimizers", default=",".join(default_optimizers),
                   help=f"comma-separated subset of: {', '.join(optimizers)} (default: %(default)s)")
    p.add_argument("--seeds", default="42", type=parse_ints,
                   help="comma-separated seeds, one run per (optimizer, seed); each is the run's --seed and "
                        "--data_seed (default: %(default)s)")
    p.add_argument("--eval_every", type=int, metavar="K",
                   help="also evaluate on the dev set every K steps during training (--eval_strategy steps "
                        "--eval_steps K), for time to quality")
    p.add_argument("--lr_grid", nargs="?", const="default", default=None,
                   help="learning-rate search instead of the comparison: 'default' (the built-in grids) or "
                        "'name=lr,lr;name=lr,...'; runs every (optimizer, lr, seed) on the search budget")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                   help="override one optimizer's learning rate (repeatable)")
    p.add_argument("--max_steps", type=int, help="optimizer steps per run (overrides the mode's budget)")
    p.add_argument("--batch_size", type=positive_int,
                   help="training examples per step (--per_device_train_batch_size; default: the benchmark's own)")
    p.add_argument("--max_train_samples", type=int, help="training examples (overrides the mode's slice)")
    p.add_argument("--max_eval_samples", type=int, help="validation examples (overrides the mode's slice)")
    p.add_argument("--warmup_skip", type=int, help="steps left out of the timing statistics (default: by mode)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run (default: %(default)s)")
    p.add_argument("--render", metavar="FOLDER",
                   help="make no run: render FOLDER/results.json's report again with this checkout's statistics")
    return p


def profile_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The options both step profiles take."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "the short mode (CI): the fewest repeats, written to a temporary folder")
    p.add_argument("--estimators", default=",".join(ESTIMATORS), type=parse_estimators,
                   help="AdaHessian's Hessian estimators to profile (default: %(default)s)")
    p.add_argument("--fd_scheme", choices=("forward", "central"), default="forward",
                   help="the finite-difference estimator's scheme (default: %(default)s)")
    return p


def schedule_cost_parser(module: str, description: str, tasks) -> argparse.ArgumentParser:
    """The options of the schedules' cost profile: which tasks, how many rounds."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "one round on each task, written to a temporary folder")
    p.add_argument("--task", choices=sorted(tasks), action="append",
                   help="the task whose model and recipe are timed (repeatable; default: every task)")
    p.add_argument("--repeats", type=positive_int, help="measured rounds (default: 31; quick 1)")
    p.add_argument("--warmup", type=int, help="rounds left out (default: 3; quick 0)")
    return p


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value, each once")
    return values


def parse_estimators(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"estimators are a subset of {', '.join(ESTIMATORS)}; got {text!r}")
    return names


def pick_optimizers(spec: str, known: list[str]) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def parse_lr_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --lr {item!r} is not NAME=LR")
        out[name.strip()] = float(value)
    return out


def parse_lr_grid(spec: str, default_grids: dict[str, tuple[float, ...]], names: list[str]) -> dict[str, list[float]]:
    """``'default'`` or ``'adamw_torch=2e-5,5e-5;adahessian_h1=1e-2,3e-2'`` -> {name: [lr, ...]}."""
    if spec == "default":
        return {n: list(default_grids[n]) for n in names}
    grid = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition("=")
        if not sep:
            raise SystemExit(f"error: --lr_grid part {part!r} is not NAME=LR,LR")
        grid[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
    pick_optimizers(",".join(grid), list(default_grids))
    return grid


def resolve_budget(args, budgets: Budgets) -> Budget:
    """The mode's budget (quick, search for ``--lr_grid``, else full), with the command line's overrides."""
    budget = budgets.quick if args.quick else budgets.search if args.lr_grid else budgets.full
    overrides = {"max_steps": args.max_steps, "train_samples": args.max_train_samples,
                 "eval_samples": args.max_eval_samples, "warmup_skip": args.warmup_skip}
    return dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v is not None})


def output_dir(args, benchmark: str, kind: str) -> Path:
    """``--output_dir``; else a fresh temporary folder in quick mode (CI never writes into the
    tracked tree); else ``benchmarks/results/<benchmark>/<kind>/``."""
    if args.output_dir:
        return Path(args.output_dir).resolve()
    if args.quick:
        path = Path(tempfile.mkdtemp(prefix=f"hf-adahessian-{benchmark}-{kind}-"))
        print(f"quick mode: writing to {path}", flush=True)
        return path
    return results_dir(benchmark, kind)
