"""Statistics of a comparison: step times, mean ± sd over seeds, ratios to AdamW, the noise rule, time to quality."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .specs import Metric

NOISE_RULE = "|Δmean| > 2·√(sd_a²/n_a + sd_b²/n_b)"
RATIO_KEYS = ("time_per_step", "cpu_time_per_step", "peak_rss", "rss_increment")


# ----------------------------------------------------------------------------- one run


def _weighted_median(times: list[float], hessian: list[bool], skip: int, interval: int | None) -> dict:
    kept = list(zip(times, hessian))[skip:]
    h_t = [t for t, h in kept if h] or [t for t, h in zip(times, hessian) if h]
    p_t = [t for t, h in kept if not h] or [t for t, h in zip(times, hessian) if not h]
    # The run's own share of Hessian steps: a warm-up of dense Hessian steps (hessian_warmup) and the
    # catch-up passes are paid like any other, so 1/interval would understate a lazy run's cost.
    frac_h = sum(map(bool, hessian)) / len(hessian) if interval and hessian else 0.0
    med_h = statistics.median(h_t) if h_t else None
    med_p = statistics.median(p_t) if p_t else None
    if med_h is None or med_p is None:
        per_step = med_h if med_p is None else med_p
    else:
        per_step = frac_h * med_h + (1 - frac_h) * med_p
    return {"per_step": per_step, "median_hessian_step": med_h, "median_plain_step": med_p, "hessian_fraction": frac_h}


def step_time_stats(record: dict, skip: int, interval: int | None) -> dict:
    """Per-step seconds after ``skip`` warm-up steps.

    ``seconds_per_step`` is the median of each kind of step (with / without a Hessian),
    weighted by how often that kind occurred in the run (its share of Hessian steps, warm-up
    included): for AdamW and interval 1 it is the plain median; for interval N it is the
    amortised cost of the run's Hessian steps and its plain ones, without letting one slow
    outlier (another process on the cores) move it. A kind with no step after the warm-up (quick runs) uses all its
    steps. ``cpu_seconds_per_step`` is the same statistic of the process's CPU time.
    """
    times, cpu, hessian = record["step_times"], record.get("step_cpu_times") or [], record["hessian"]
    kept = times[skip:] or times
    wall = _weighted_median(times, hessian, skip, interval)
    out = {
        "seconds_per_step": wall["per_step"],
        "median_hessian_step_s": wall["median_hessian_step"],
        "median_plain_step_s": wall["median_plain_step"],
        "hessian_fraction": wall["hessian_fraction"],
        "median_s": statistics.median(kept),
        "mean_s": statistics.fmean(kept),
        "steps_counted": len(kept),
        "warmup_skipped": min(skip, len(times)),
    }
    if cpu:
        out["cpu_seconds_per_step"] = _weighted_median(cpu, hessian, skip, interval)["per_step"]
    return out


def ok(record: dict) -> bool:
    return record.get("returncode") == 0


def ratios(record: dict, base: dict) -> dict:
    """Time, CPU time, peak RSS and training RSS increment of ``record`` over ``base``'s (same seed)."""
    st, bst = record["step_time"], base["step_time"]
    c, bc = st.get("cpu_seconds_per_step"), bst.get("cpu_seconds_per_step")
    return {
        "time_per_step": st["seconds_per_step"] / bst["seconds_per_step"],
        "cpu_time_per_step": c / bc if c and bc else None,
        "peak_rss": record["peak_rss_train_mb"] / base["peak_rss_train_mb"],
        "rss_increment": record["rss_increment_mb"] / base["rss_increment_mb"] if base["rss_increment_mb"] > 0 else None,
    }


# ----------------------------------------------------------------------------- over seeds


@dataclass(frozen=True)
class MeanSd:
    """Mean and sample standard deviation (n − 1) of the values that exist; sd is None below two."""

    mean: float | None
    sd: float | None
    n: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def mean_sd(values) -> MeanSd:
    """NaN and None are left out; an infinite value (a diverged run's perplexity) makes the mean infinite
    and the sd None."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return MeanSd(None, None, 0)
    if not all(math.isfinite(v) for v in values):
        return MeanSd(statistics.fmean(values), None, len(values))
    return MeanSd(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def beyond_noise(a: MeanSd, b: MeanSd) -> bool | None:
    """Whether a and b differ by more than the noise (:data:`NOISE_RULE`); None with fewer than two values a side."""
    if a.sd is None or b.sd is None:
        return None
    return abs(a.mean - b.mean) > 2 * math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)


def group_key(record: dict) -> tuple[str, float]:
    return record["optimizer"], record["lr"]


def summarize(records: list[dict], baseline: str, metric: Metric) -> list[dict]:
    """One summary per (optimizer, lr) in the order of first appearance: each number as mean ± sd over seeds,
    the ratios to the baseline of the same seed, and the metric's difference to the baseline's mean
    (this mean less the baseline's, whichever way is better) with whether it is better (``metric``'s direction).

    The baseline group is the baseline optimizer's, when it ran at exactly one learning rate.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    base_keys = [k for k in groups if k[0] == baseline]
    base_metric = mean_sd(r.get("metric") for r in groups[base_keys[0]] if ok(r)) if len(base_keys) == 1 else None
    out = []
    for (name, lr), runs in groups.items():
        good = [r for r in runs if ok(r)]
        dev = mean_sd(r.get("metric") for r in good)
        losses = [statistics.fmean(r["losses"][-10:]) if r.get("losses") else None for r in good]
        summary = {
            "optimizer": name, "lr": lr, "hessian_interval": runs[0].get("hessian_interval"), "path": runs[0]["path"],
            "seeds": [r["seed"] for r in good], "failed": [r["name"] for r in runs if not ok(r)],
            "metric": dev.to_json(),
            "seconds_per_step": mean_sd(r["step_time"]["seconds_per_step"] for r in good).to_json(),
            "peak_rss_train_mb": mean_sd(r["peak_rss_train_mb"] for r in good).to_json(),
            "rss_increment_mb": mean_sd(r["rss_increment_mb"] for r in good).to_json(),
            "loss_last_10_steps": mean_sd(losses).to_json(),
            "ratios": {k: mean_sd(r.get("ratios", {}).get(k) for r in good).to_json() for k in RATIO_KEYS},
        }
        if base_metric is not None and base_metric.n and dev.n and name != baseline:
            summary["metric_difference"] = dev.mean - base_metric.mean
            summary["better_than_baseline"] = metric.better(dev.mean, base_metric.mean)
            summary["beyond_noise"] = beyond_noise(dev, base_metric)
        out.append(summary)
    return out


def best_lr(summaries: list[dict], metric: Metric) -> dict[str, dict]:
    """Per optimizer, the learning rate with the best mean metric."""
    best: dict[str, dict] = {}
    for s in summaries:
        value = s["metric"]["mean"]
        if value is None:
            continue
        b = best.get(s["optimizer"])
        if b is None or metric.better(value, b["metric"]):
            best[s["optimizer"]] = {"lr": s["lr"], "metric": value, "n": s["metric"]["n"]}
    return best


# ----------------------------------------------------------------------------- time to quality


def quality_curve(record: dict, metric: Metric) -> list[tuple[int, float, float]]:
    """(step, training seconds, metric) of every evaluation of a run, one per step (the last), in step order."""
    by_step = {}
    for e in record.get("evaluations") or []:
        value = metric.value(e["metrics"])
        if value is not None and e.get("train_s") is not None:
            by_step[e["step"]] = (e["step"], e["train_s"], value)
    return [by_step[s] for s in sorted(by_step)]


def first_reaching(curve, target: float, metric: Metric) -> tuple[int, float] | None:
    for step, seconds, value in curve:
        if metric.better_or_equal(value, target):
            return step, seconds
    return None


def value_at(curve, seconds: float) -> float | None:
    """The metric of the last evaluation made within ``seconds`` of training."""
    values = [v for _, s, v in curve if s <= seconds]
    return values[-1] if values else None


def time_to_quality(records: list[dict], metric: Metric, baseline: str) -> dict | None:
    """Per optimizer: steps and training seconds to first reach the baseline's final metric (mean over seeds),
    and the metric reached within the baseline's training wall-clock (mean over seeds)."""
    base = [r for r in records if r["optimizer"] == baseline and ok(r)]
    if not base:
        return None
    target = mean_sd(r.get("metric") for r in base).mean
    budget_s = mean_sd(r.get("train_wall_s") for r in base).mean
    if target is None or budget_s is None:
        return None
    out = {"target": target, "budget_s": budget_s, "by_optimizer": {}}
    for name in dict.fromkeys(r["optimizer"] for r in records):
        runs = [r for r in records if r["optimizer"] == name and ok(r)]
        curves = [quality_curve(r, metric) for r in runs]
        reached = [first_reaching(c, target, metric) for c in curves]
        hits = [h for h in reached if h is not None]
        out["by_optimizer"][name] = {
            "n": len(runs), "reached": len(hits),
            "steps_to_target": mean_sd(h[0] for h in hits).to_json(),
            "seconds_to_target": mean_sd(h[1] for h in hits).to_json(),
            "metric_at_budget": mean_sd(value_at(c, budget_s) for c in curves).to_json(),
            "evaluations": len(curves[0]) if curves else 0,
        }
    return out
