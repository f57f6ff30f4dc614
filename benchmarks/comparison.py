"""The parent's side of a comparison (or a learning-rate search): plan the runs, run each, compare, report.

Runs go seed by seed (every optimizer at seed 42, then every one at 43, …), so that a
run and the AdamW run it is compared with (same seed) are close in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import report, stats
from .data import DataFiles, data_files, require_data
from .machine import child_env
from .options import comparison_parser, output_dir, parse_lr_grid, parse_lr_overrides, pick_optimizers, resolve_budget
from .runs import Run, fresh_run_dir, run_child, schedule_args, warmup_steps
from .specs import BASELINE, Budget, Budgets, Experiment, OptimizerSpec


def kind(args) -> str:
    """The results folder's kind: ``lr_search`` with ``--lr_grid``, else ``comparison``."""
    return "lr_search" if args.lr_grid else "comparison"


def plan(registry: Mapping[str, OptimizerSpec], args) -> list[Run]:
    """Every chosen optimizer at its learning rate (or every (optimizer, lr) of the grid), for every seed.

    Called first, so that a bad ``--optimizers`` or ``--lr_grid`` fails before any work."""
    names = pick_optimizers(args.optimizers, list(registry))
    lrs = {n: registry[n].lr for n in names}
    lrs.update({k: v for k, v in parse_lr_overrides(args.lr).items() if k in lrs})
    if args.lr_grid:
        grids = parse_lr_grid(args.lr_grid, {n: s.grid for n, s in registry.items()}, names)
        pairs = [(n, lr) for n, grid in grids.items() for lr in grid]
    else:
        pairs = [(n, lrs[n]) for n in names]
    return [Run(registry[n], lr, seed, lr_in_name=bool(args.lr_grid)) for seed in args.seeds for n, lr in pairs]


@dataclass(frozen=True)
class Setup:
    """A comparison's start, from its command line: what every benchmark's ``main`` needs."""

    args: argparse.Namespace
    runs: list[Run]
    budget: Budget
    folder: Path  # the shared data folder the benchmark reads
    data: DataFiles  # the files the runs read (quick mode: slices)
    out_dir: Path
    env: dict  # the children's environment


def setup(module: str, doc: str, registry: Mapping[str, OptimizerSpec], default, budgets: Budgets, name: str,
          data_name: str | None = None) -> Setup:
    """Parse the options, plan the runs (a bad ``--optimizers`` or ``--lr_grid`` fails here, before any work),
    pick the budget, find the data (``data_name``, default ``name``; SKIPPED without them) and cut quick mode's
    slices, make the output folder's path and the children's environment."""
    args = comparison_parser(module, doc, list(registry), list(default)).parse_args()
    runs = plan(registry, args)
    budget = resolve_budget(args, budgets)
    folder = require_data(args.data_dir, data_name or name)
    data = data_files(folder, budget, args.quick)
    out_dir = output_dir(args, name, kind(args))
    return Setup(args, runs, budget, folder, data, out_dir, child_env(args.threads, data.datasets_cache))


def complete(record: dict, budget: Budget, experiment: Experiment) -> None:
    """A finished run's step-time statistics and final metric."""
    record["steps"] = len(record["step_times"])
    record["step_time"] = stats.step_time_stats(record, budget.warmup_skip, record["hessian_interval"])
    record["metric"] = experiment.metric.value(record.get("eval_metrics"))
    print(f"  done in {record['process_wall_s']:.0f}s: {record['step_time']['seconds_per_step']:.3f} s/step, "
          f"peak RSS {record['peak_rss_train_mb']:.0f} MB, dev {experiment.metric.label} {record['metric']}",
          flush=True)


def baseline_of(names) -> str:
    """The AdamW run the others are measured against: ``adamw_torch`` when it ran, else the one AdamW
    variant that did (``adamw_torch_lora`` in a LoRA comparison); ``adamw_torch`` when there is none."""
    names = set(names)
    variants = sorted(n for n in names if n.startswith(BASELINE + "_"))
    return BASELINE if BASELINE in names or len(variants) != 1 else variants[0]


def compare_to_baseline(records: list[dict], baseline: str = BASELINE) -> None:
    """Each run against the baseline's run of the same seed: whether it saw the same batches, and its
    ratios (only where that seed has one baseline run: a search may run the baseline at several lrs)."""
    bases: dict[int, list[dict]] = {}
    for r in records:
        if r["optimizer"] == baseline and stats.ok(r):
            bases.setdefault(r["seed"], []).append(r)
    for r in records:
        seed_bases = bases.get(r["seed"])
        if not seed_bases or not stats.ok(r):
            continue
        fp, base_fp = r.get("fingerprints"), seed_bases[0].get("fingerprints")
        r["same_batches_as_adamw"] = (fp == base_fp) if fp and base_fp else None
        if len(seed_bases) == 1:
            r["ratios"] = stats.ratios(r, seed_bases[0])


def run_comparison(experiment: Experiment, start: Setup, module: str, extra_meta: dict | None = None) -> list[dict]:
    """Run the plan, one child per run, then write table.md, results.json, loss.png (and quality.png)."""
    args, runs, budget, env, out_dir = start.args, start.runs, start.budget, start.env, start.out_dir
    if args.render:
        return render_saved(experiment, Path(args.render), module)
    runs_dir = out_dir / "runs"  # git-ignored: Trainer output folders, logs, the partial results
    meta = {
        "benchmark": experiment.title, "name": experiment.name, "kind": kind(args), "quick": args.quick,
        "budget": dataclasses.asdict(budget), "budgets": dataclasses.asdict(experiment.budgets),
        "warmup_steps": warmup_steps(budget), "seeds": args.seeds, "eval_every": args.eval_every,
        "metric": dataclasses.asdict(experiment.metric), "script": experiment.script,
        "optimizers": {r.spec.name: r.spec.to_json() for r in runs},
        **report.provenance(args.threads, module), **(extra_meta or {}),
    }
    records = []
    for run in runs:
        run_dir = fresh_run_dir(runs_dir, run)
        script_args = [*experiment.script_args,
                       *schedule_args(budget, run.seed, run_dir, args.eval_every, sliced=args.quick)]
        record = run_child(run, experiment.script, script_args, env, runs_dir, args.timeout)
        if stats.ok(record):
            complete(record, budget, experiment)
        records.append(record)
        report.write_json(runs_dir / "results.partial.json", {**meta, "runs": records})
    write_results(experiment, meta, records, out_dir)
    (runs_dir / "results.partial.json").unlink(missing_ok=True)
    return records


def render_saved(experiment: Experiment, folder: Path, module: str) -> list[dict]:
    """The report of a finished comparison again, from ``folder/results.json``, with this checkout's
    statistics (no run is made); what rendered it is recorded beside the original provenance."""
    saved = json.loads((folder / "results.json").read_text())
    records = saved.pop("runs")
    budget = Budget(**saved["budget"])
    for record in records:
        if stats.ok(record):
            complete(record, budget, experiment)
    provenance = report.provenance(1, module)
    saved["rendered_again"] = {"git": provenance["git"], "invocation": provenance["invocation"]}
    write_results(experiment, saved, records, folder)
    return records


def write_results(experiment: Experiment, meta: dict, records: list[dict], out_dir: Path) -> None:
    """table.md, results.json, loss.png (and quality.png) from the finished runs (``meta`` and the
    ``runs`` of a saved results.json render the same report again)."""
    lr_search, quick, eval_every = meta["kind"] == "lr_search", meta["quick"], meta["eval_every"]
    baseline = meta["baseline"] = baseline_of(r["optimizer"] for r in records)
    compare_to_baseline(records, baseline)
    summaries = stats.summarize(records, baseline, experiment.metric)
    heading = f"## {experiment.title}{' (quick)' if quick else ''}{' lr search' if lr_search else ''}"
    seeds = ", ".join(map(str, meta["seeds"]))
    lines = [heading, "", f"{meta['budget']['max_steps']} steps per run; seeds {seeds}; `{meta['invocation']}`", ""]
    if baseline != BASELINE:
        lines += [f"Baseline: `{baseline}` (ratios and Δ are to it).", ""]
    extra = {}
    if lr_search:
        best = stats.best_lr(summaries, experiment.metric)
        lines += [report.lr_search_table(summaries, best, experiment.metric)]
        extra["best_lr"] = best
    else:
        lines += [report.comparison_table(summaries, experiment.metric)]
    if eval_every:
        ttq = stats.time_to_quality(records, experiment.metric, baseline)
        lines += ["", "### Time to quality", "", report.time_to_quality_table(ttq, experiment.metric, eval_every)]
        extra["time_to_quality"] = ttq
    lines += ["", "### Runs", "", report.runs_table(records, experiment.metric), ""]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(stats.group_key(r), []).append(r)
    suffix = " (quick)" if quick else ""
    report.plot_losses(groups, out_dir / "loss.png", f"{experiment.title}: training loss{suffix}")
    if eval_every:
        report.plot_quality(groups, lambda r: stats.quality_curve(r, experiment.metric), experiment.metric,
                            out_dir / "quality.png", f"{experiment.title}: dev {experiment.metric.label}{suffix}")
    report.write_report(out_dir, "\n".join(lines), {**meta, "summary": summaries, **extra, "runs": records})
