"""What a benchmark writes: markdown tables, ``results.json`` (with its provenance), plots.

Every ``results.json`` records the git commit (``git rev-parse HEAD``) and whether tracked
files differed from it, the machine, and the invocation; all of it through
``paths.portable`` (repository-relative paths, the interpreter as ``python``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

from .machine import git_state, machine_info
from .paths import portable
from .specs import Metric
from .stats import NOISE_RULE


def fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def pm(ms: dict, spec: str = ".3f", signed: bool = False) -> str:
    """A mean ± sd (as ``stats.MeanSd.to_json``); just the mean with one value."""
    if ms is None or ms.get("mean") is None:
        return "–"
    mean = format(ms["mean"], ("+" if signed else "") + spec)
    return mean if ms.get("sd") is None else f"{mean} ± {format(ms['sd'], spec)}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def invocation(module: str) -> str:
    """The command that made this output, as it is typed in the repository root."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def provenance(threads: int, module: str) -> dict:
    return {"git": git_state(), "invocation": invocation(module), "machine": machine_info(threads)}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(portable(obj), indent=1, default=str))
    tmp.replace(path)


def write_report(out_dir: Path, text: str, meta: dict) -> None:
    """``table.md`` (the text, also printed) and ``results.json`` (``meta``, portable) in ``out_dir``."""
    meta["machine"]["load_average_at_end"] = os.getloadavg()
    print("\n" + text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text)
    write_json(out_dir / "results.json", meta)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'table.md'}", flush=True)


# ----------------------------------------------------------------------------- comparison tables


def dev_header(metric: Metric) -> str:
    """``dev accuracy``; a lower-is-better metric says so: ``dev perplexity (lower is better)``."""
    return f"dev {metric.label}" + ("" if metric.higher_is_better else " (lower is better)")


def noise_cell(summary: dict) -> str:
    """Beyond noise: "yes (better)" / "yes (worse)" (the metric's direction), "no", "–" below two seeds a side."""
    noise = summary.get("beyond_noise")
    if noise is None:
        return "–"
    if not noise:
        return "no"
    return "yes (better)" if summary.get("better_than_baseline") else "yes (worse)"


def comparison_table(summaries: list[dict], metric: Metric) -> str:
    label = metric.label
    headers = ["optimizer", "lr", "Hessian every", "path", "n", dev_header(metric), f"Δ{label} vs AdamW",
               "beyond noise", "s/step", "× AdamW", "CPU s/step × AdamW", "peak RSS MB", "× AdamW",
               "train Δ RSS × AdamW", "loss, last 10 steps"]
    rows = []
    for s in summaries:
        ra = s["ratios"]
        rows.append([
            s["optimizer"], fmt(s["lr"], "g"), fmt(s["hessian_interval"], "d"), s["path"],
            f"{s['metric']['n']}" + (f" ({len(s['failed'])} failed)" if s["failed"] else ""),
            pm(s["metric"], metric.format), fmt(s.get("metric_difference"), "+" + metric.format),
            noise_cell(s),
            pm(s["seconds_per_step"]), pm(ra["time_per_step"], ".2f"), pm(ra["cpu_time_per_step"], ".2f"),
            pm(s["peak_rss_train_mb"], ".0f"), pm(ra["peak_rss"], ".2f"), pm(ra["rss_increment"], ".2f"),
            pm(s["loss_last_10_steps"]),
        ])
    caption = (f"Mean ± sd over n seeds (sd: sample standard deviation; one seed: the value alone). Ratios: each "
               f"seed's run over AdamW's run with the same seed in this invocation, then mean ± sd. Δ{label}: the "
               f"difference of the means (this optimizer's less AdamW's; {label}: {metric.direction}, so a "
               f"{'positive' if metric.higher_is_better else 'negative'} Δ is better). Beyond noise: {NOISE_RULE}, "
               f"a and b this optimizer's and AdamW's dev {label} over seeds, and which way (better or worse); "
               f"'–' with fewer than two seeds on a side.")
    return markdown_table(headers, rows) + "\n\n" + caption


def runs_table(records: list[dict], metric: Metric) -> str:
    headers = ["run", "lr", "seed", "steps", dev_header(metric), "s/step", "× AdamW (same seed)", "peak RSS MB",
               "× AdamW", "same batches as AdamW", "process s"]
    rows = []
    for r in records:
        if r.get("returncode") != 0:
            rows.append([r["name"], fmt(r["lr"], "g"), r["seed"], "", f"FAILED (rc={r.get('returncode')})"]
                        + [""] * (len(headers) - 5))
            continue
        ra = r.get("ratios") or {}
        rows.append([r["name"], fmt(r["lr"], "g"), r["seed"], r["steps"], metric.show(r.get("metric")),
                     fmt(r["step_time"]["seconds_per_step"]), fmt(ra.get("time_per_step"), ".2f"),
                     fmt(r["peak_rss_train_mb"], ".0f"), fmt(ra.get("peak_rss"), ".2f"),
                     fmt({True: "yes", False: "no"}.get(r.get("same_batches_as_adamw"))), fmt(r["process_wall_s"], ".0f")])
    return markdown_table(headers, rows)


def lr_search_table(summaries: list[dict], best: dict, metric: Metric) -> str:
    headers = ["optimizer", "lr", "n", dev_header(metric), "s/step", "loss, last 10 steps"]
    rows = [[s["optimizer"], fmt(s["lr"], "g"), s["metric"]["n"], pm(s["metric"], metric.format),
             pm(s["seconds_per_step"]), pm(s["loss_last_10_steps"])] for s in summaries]
    line = ", ".join(f"{k}: {v['lr']:g} ({metric.show(v['metric'])}, n={v['n']})" for k, v in best.items())
    return (markdown_table(headers, rows) + f"\n\nbest lr per optimizer (by mean dev {metric.label} over seeds, "
            f"{metric.direction}): " + (line or "–"))


def time_to_quality_table(ttq: dict | None, metric: Metric, eval_every: int) -> str:
    if ttq is None:
        return "Time to quality: no AdamW run finished in this invocation, so there is no target."
    target, budget = f"{metric.at_least} {metric.show(ttq['target'])}", ttq["budget_s"]
    headers = ["optimizer", f"steps to {metric.label} {target}", f"training s to {metric.label} {target}",
               f"{dev_header(metric)} within {budget:.0f} s of training"]
    rows = []
    for name, t in ttq["by_optimizer"].items():
        reached = f" ({t['reached']}/{t['n']} seeds)" if 0 < t["reached"] < t["n"] else ""
        if t["reached"] == 0:
            steps = seconds = "not reached"
        else:
            steps, seconds = pm(t["steps_to_target"], ".0f") + reached, pm(t["seconds_to_target"], ".0f") + reached
        rows.append([name, steps, seconds, pm(t["metric_at_budget"], metric.format)])
    caption = (f"Evaluated on the dev set every {eval_every} steps and after training. Target: AdamW's final dev "
               f"{metric.label}, mean over its seeds; steps and seconds: the first evaluation at or "
               f"{'above' if metric.higher_is_better else 'below'} it ({metric.direction}), mean ± sd "
               f"over the seeds that reached it. Budget: AdamW's training wall-clock, mean over its seeds; the value "
               f"is the last evaluation made within it. Training seconds leave the evaluations out. Plot: quality.png.")
    return markdown_table(headers, rows) + "\n\n" + caption


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(name: str, lr: float, n: int) -> str:
    return f"{name} (lr {lr:g}" + (f", {n} seeds)" if n > 1 else ")")


def _mean_columns(rows: list[list[float]]) -> list[float]:
    length = min(len(r) for r in rows)
    return [statistics.fmean(r[i] for r in rows) for i in range(length)]


def plot_losses(groups: dict[tuple, list[dict]], path: Path, title: str, smooth: int = 10) -> None:
    """Training loss against steps and against training seconds, one line per (optimizer, lr), mean over seeds."""
    plt = _pyplot()
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, lr), runs in groups.items():
        runs = [r for r in runs if r.get("returncode") == 0 and r.get("losses")]
        if not runs:
            continue
        losses, wall = _mean_columns([r["losses"] for r in runs]), _mean_columns([r["wall_s"] for r in runs])
        k = max(1, min(smooth, len(losses) // 5))
        smoothed = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        label = _label(name, lr, len(runs))
        ax_s.plot(range(1, len(smoothed) + 1), smoothed, label=label)
        ax_t.plot(wall[: len(smoothed)], smoothed[: len(wall)], label=label)
    ax_s.set_xlabel("optimizer step")
    for ax in (ax_s, ax_t):
        ax.set_ylabel(f"training loss (running mean of ≤{smooth} steps)")
    _finish(plt, fig, (ax_s, ax_t), ax_t, title, path)


def plot_quality(groups: dict[tuple, list[dict]], curves, metric: Metric, path: Path, title: str) -> None:
    """The dev metric against training seconds, one line per (optimizer, lr): mean over seeds, shaded ± sd.

    ``curves(record)`` gives a run's (step, seconds, value) points; seeds are matched by evaluation index.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, lr), runs in groups.items():
        points = [curves(r) for r in runs if r.get("returncode") == 0]
        points = [p for p in points if p]
        if not points:
            continue
        length = min(len(p) for p in points)
        xs = [statistics.fmean(p[i][1] for p in points) for i in range(length)]
        ys = [statistics.fmean(p[i][2] for p in points) for i in range(length)]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=_label(name, lr, len(points)))
        if len(points) > 1 and all(math.isfinite(p[i][2]) for p in points for i in range(length)):
            sd = [statistics.stdev(p[i][2] for p in points) for i in range(length)]
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            color=line.get_color(), alpha=0.2)
    ax.set_ylabel(dev_header(metric))
    if metric.log_scale:
        ax.set_yscale("log")
    _finish(plt, fig, (ax,), ax, title, path)


def _finish(plt, fig, axes, seconds_axis, title: str, path: Path) -> None:
    """Grid, legend, title; the seconds axis labelled; saved and closed."""
    seconds_axis.set_xlabel("training seconds (evaluations left out)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
