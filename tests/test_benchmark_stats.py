"""The benchmark harness's comparisons follow the metric's direction: accuracy (higher is better) and
perplexity (lower is better) through the same code: reading the metric, the best lr, reaching AdamW's
final value, better or worse beyond the noise, the tables. Synthetic records; no run, no data."""

import math

import pytest

from benchmarks import report, stats
from benchmarks.specs import Metric

ACCURACY = Metric("eval_accuracy", "accuracy", higher_is_better=True)
PERPLEXITY = Metric("eval_loss", "perplexity", higher_is_better=False, format=".2f", transform="exp")


def record(optimizer, lr, seed, metric, curve=(), train_wall_s=10.0):
    """A finished run as ``comparison.complete`` leaves it; ``curve``: (step, train_s, metrics) evaluations."""
    return {
        "optimizer": optimizer, "lr": lr, "seed": seed, "name": f"{optimizer}_lr{lr}_seed{seed}", "returncode": 0,
        "hessian_interval": None, "path": "trainer", "metric": metric,
        "step_time": {"seconds_per_step": 1.0}, "peak_rss_train_mb": 100.0, "rss_increment_mb": 10.0,
        "losses": [1.0], "train_wall_s": train_wall_s,
        "evaluations": [{"step": step, "train_s": s, "metrics": metrics} for step, s, metrics in curve],
    }


def evaluations(metric: Metric, points):
    """(step, train_s, value) -> evaluations whose metrics hold what the script reports (perplexity: eval_loss)."""
    def reported(value):
        return {metric.key: math.log(value) if metric.transform == "exp" else value}
    return [(step, s, reported(v)) for step, s, v in points]


def test_metric_reads_perplexity_from_eval_loss():
    assert PERPLEXITY.value({"eval_loss": math.log(20.0)}) == pytest.approx(20.0)
    assert PERPLEXITY.value({"eval_loss": 1e4}) == math.inf  # a diverged run, as run_clm.py writes it
    assert PERPLEXITY.value({"eval_accuracy": 0.5}) is None and PERPLEXITY.value(None) is None
    assert ACCURACY.value({"eval_accuracy": 0.8}) == 0.8
    assert (PERPLEXITY.at_least, ACCURACY.at_least) == ("≤", "≥")
    with pytest.raises(ValueError):
        Metric("eval_loss", "perplexity", transform="log")


@pytest.mark.parametrize("metric, good, bad", [(ACCURACY, 0.9, 0.7), (PERPLEXITY, 20.0, 40.0)])
def test_best_lr_follows_the_direction(metric, good, bad):
    summaries = [{"optimizer": "x", "lr": 1e-3, "metric": {"mean": bad, "n": 1}},
                 {"optimizer": "x", "lr": 1e-2, "metric": {"mean": good, "n": 1}},
                 {"optimizer": "x", "lr": 1e-1, "metric": {"mean": None, "n": 0}}]
    assert stats.best_lr(summaries, metric)["x"]["lr"] == 1e-2


@pytest.mark.parametrize("metric, base, better, worse", [
    (ACCURACY, (0.80, 0.81), (0.90, 0.91), (0.60, 0.61)),
    (PERPLEXITY, (30.0, 31.0), (20.0, 21.0), (50.0, 51.0)),
])
def test_summary_and_table_say_better_or_worse(metric, base, better, worse):
    records = [record(n, 0.1, seed, v) for n, values in (("adamw_torch", base), ("good", better), ("bad", worse))
               for seed, v in zip((42, 43), values)]
    by_name = {s["optimizer"]: s for s in stats.summarize(records, "adamw_torch", metric)}
    assert by_name["good"]["beyond_noise"] and by_name["good"]["better_than_baseline"]
    assert by_name["bad"]["beyond_noise"] and not by_name["bad"]["better_than_baseline"]
    # The difference is this optimizer's mean less AdamW's, whichever way is better.
    assert by_name["good"]["metric_difference"] == pytest.approx(sum(better) / 2 - sum(base) / 2)
    rows = {line.split(" | ")[0].strip("| "): line for line in
            report.comparison_table(list(by_name.values()), metric).splitlines()}
    assert "yes (better)" in rows["good"] and "yes (worse)" in rows["bad"]
    assert ("lower is better" in rows["optimizer"]) is (not metric.higher_is_better)


@pytest.mark.parametrize("metric, points, target", [
    (ACCURACY, [(2, 1.0, 0.5), (4, 2.0, 0.85), (6, 3.0, 0.9)], 0.8),
    (PERPLEXITY, [(2, 1.0, 90.0), (4, 2.0, 25.0), (6, 3.0, 20.0)], 30.0),
])
def test_time_to_quality_reaches_the_target_in_the_metric_direction(metric, points, target):
    base = record("adamw_torch", 0.1, 42, target, evaluations(metric, [(6, 3.0, target)]), train_wall_s=1.5)
    run = record("x", 0.1, 42, points[-1][2], evaluations(metric, points))
    ttq = stats.time_to_quality([base, run], metric, "adamw_torch")
    x = ttq["by_optimizer"]["x"]
    assert (x["reached"], x["steps_to_target"]["mean"], x["seconds_to_target"]["mean"]) == (1, 4, 2.0)
    assert x["metric_at_budget"]["mean"] == pytest.approx(points[0][2])  # the last evaluation within 1.5 s
    table = report.time_to_quality_table(ttq, metric, 2)
    assert f"steps to {metric.label} {metric.at_least} {metric.show(target)}" in table


def test_an_infinite_perplexity_keeps_the_summary_alive():
    ms = stats.mean_sd([20.0, math.inf])
    assert (ms.mean, ms.sd, ms.n) == (math.inf, None, 2)
    assert stats.beyond_noise(ms, stats.mean_sd([20.0, 21.0])) is None


def test_the_baseline_is_adamw_or_the_one_adamw_variant_that_ran():
    from benchmarks.comparison import baseline_of

    assert baseline_of(["adamw_torch", "adahessian_h1", "adamw_torch_lora"]) == "adamw_torch"
    assert baseline_of(["adamw_torch_lora", "adahessian_h1_f6_fd_lora"]) == "adamw_torch_lora"
    # no AdamW, or two variants and no plain AdamW: nothing is chosen for the reader
    assert baseline_of(["adahessian_h1"]) == "adamw_torch"
    assert baseline_of(["adamw_torch_lora", "adamw_torch_other"]) == "adamw_torch"


def test_the_amortised_step_counts_the_runs_own_hessian_steps_warm_up_included():
    """Interval 10 after 5 dense steps, 20 steps: Hessian steps 1-5, 6 and 16 (7 of 20), 3 s each, plain 1 s:
    the amortised cost is 7/20·3 + 13/20·1, not 1/10·3 + 9/10·1."""
    hessian = [i < 5 or (i - 5) % 10 == 0 for i in range(20)]
    record = {"step_times": [3.0 if h else 1.0 for h in hessian], "hessian": hessian}
    out = stats.step_time_stats(record, skip=2, interval=10)
    assert out["hessian_fraction"] == 7 / 20
    assert out["seconds_per_step"] == pytest.approx(7 / 20 * 3 + 13 / 20 * 1)
    assert stats.step_time_stats({"step_times": [1.0] * 4, "hessian": [False] * 4}, 0, None)["hessian_fraction"] == 0


def test_a_saved_comparison_renders_again_with_the_current_statistics(tmp_path, monkeypatch):
    """``--render FOLDER``: the committed 3-seed lazy comparison (recorded when a lazy run's cost was
    taken as 1/interval Hessian steps) rendered again: each run's amortised cost now counts its own
    share of Hessian steps (29 of 150 after a 15-step warm-up), the runs themselves are unchanged."""
    import json
    import shutil
    from pathlib import Path

    from benchmarks import comparison, sst2
    from benchmarks.specs import Experiment

    saved = Path(__file__).resolve().parents[1] / "benchmarks/results/sst2/seeds_lazy/results.json"
    shutil.copy(saved, tmp_path / "results.json")
    monkeypatch.setattr(report, "plot_losses", lambda *a, **k: None)
    monkeypatch.setattr(report, "plot_quality", lambda *a, **k: None)
    experiment = Experiment(name="sst2", title="MiniLM on SST-2", script="run_glue.py", metric=sst2.METRIC,
                            budgets=sst2.BUDGETS, script_args=())
    records = comparison.render_saved(experiment, tmp_path, "benchmarks.sst2")
    again = json.loads((tmp_path / "results.json").read_text())
    before = json.loads(saved.read_text())
    assert [r["name"] for r in again["runs"]] == [r["name"] for r in before["runs"]]
    assert [r["step_times"] for r in again["runs"]] == [r["step_times"] for r in before["runs"]]
    lazy = [r for r in records if "_w15" in r["optimizer"]]
    assert lazy and all(r["step_time"]["hessian_fraction"] == 29 / 150 for r in lazy)
    for r in lazy:
        t = r["step_time"]
        assert t["seconds_per_step"] == pytest.approx(
            29 / 150 * t["median_hessian_step_s"] + 121 / 150 * t["median_plain_step_s"])
    assert "rendered_again" in again and "table.md" in {p.name for p in tmp_path.iterdir()}


def test_the_profiles_schedules_weigh_the_medians_by_the_optimizers_own_schedule():
    """The recipe takes 22 of 150 steps with a Hessian (15 dense, then 15, 35, …, 135); 5 dense steps 13; every
    third of the 15 warm-up steps 12. A run's time per step is those shares of the two steps' medians."""
    from benchmarks.profile_hessian_step import BETWEEN, FUSED_ADAMW, HESSIAN_STEP, schedule_lines
    from benchmarks.schedule_cost import hessian_steps

    assert [hessian_steps(20, 15), hessian_steps(20, 5), hessian_steps(20, 15, 3)] == [22, 13, 12]
    totals = {"adamw step": 0.5, FUSED_ADAMW: 0.4, BETWEEN: 0.4, HESSIAN_STEP["finite_difference"]: 1.0}
    recipe = schedule_lines(totals)[0]
    per_step = (128 * 0.4 + 22 * 1.0) / 150
    assert f"{per_step:.3f} s/step" in recipe
    assert f"{per_step / 0.5:.2f}× the AdamW step" in recipe and f"{per_step / 0.4:.2f}× the fused AdamW step" in recipe
    assert schedule_lines({k: v for k, v in totals.items() if k != BETWEEN}) == []


def test_the_schedule_cost_weighs_each_tasks_rows_by_their_own_hessian_steps_in_the_tasks_budget():
    """From scratch the budget is 800 steps: the recipe takes 15 dense + 40 lazy Hessian steps, the warm-up interval
    5 + 40. The AdaHessian steps run under the recipe row's settings less its schedule."""
    from benchmarks import multi30k
    from benchmarks.schedule_cost import ADAMW, BETWEEN, HESSIAN, TASKS, recipe_kwargs, schedule_rows

    task = TASKS["multi30k"]
    rows = {r["row"]: r for r in schedule_rows(task, {ADAMW: 0.3, BETWEEN: 0.3, HESSIAN: 0.6})}
    recipe, interval = rows["adahessian_h20_b32_fd_w15_sg_sga_ch"], rows["adahessian_h20_b32_fd_w15_i3_sg_sga_ch"]
    assert (recipe["hessian_steps"], interval["hessian_steps"], recipe["steps"]) == (55, 45, 800)
    assert recipe["x_fused_adamw"] == pytest.approx((745 * 0.3 + 55 * 0.6) / 800 / 0.3)
    kwargs = recipe_kwargs(multi30k.OPTIMIZERS[task.recipe].optim_args)
    assert kwargs["block_size"] == 32 and kwargs["clip_hessian"] and kwargs["hessian_estimator"] == "finite_difference"
    assert not {"hessian_interval", "hessian_warmup", "hessian_warmup_interval", "hessian_chunks"} & set(kwargs)
