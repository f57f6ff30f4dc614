"""Shared pieces of the benchmark scripts: options, subprocess runs, step-time statistics,
tables, JSON and plots.

Every optimizer run is its own process (``runner.py``), so that its peak RSS is its own;
the parent only builds command lines, collects each child's JSON and compares.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
RUNNER = HERE / "runner.py"
BASELINE = "adamw_torch"


# ----------------------------------------------------------------------------- machine


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


def bench_env(threads: int) -> dict:
    """The same thread settings and offline switches for every child process."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        BENCH_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


# ----------------------------------------------------------------------------- options


def base_parser(description: str, optimizers: list[str], default_optimizers: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps on small slices (CI smoke run, ~2 minutes)")
    p.add_argument("--optimizers", default=",".join(default_optimizers),
                   help=f"comma-separated subset of: {', '.join(optimizers)} (default: %(default)s)")
    p.add_argument("--lr_grid", nargs="?", const="default", default=None,
                   help="learning-rate search instead of the comparison: 'default' (the built-in grids) or "
                        "'name=lr,lr;name=lr,...'; runs every (optimizer, lr) on the search budget")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                   help="override one optimizer's learning rate (repeatable)")
    p.add_argument("--max_steps", type=int, help="optimizer steps per run (overrides the mode's budget)")
    p.add_argument("--max_train_samples", type=int, help="training examples (overrides the mode's slice)")
    p.add_argument("--max_eval_samples", type=int, help="validation examples (overrides the mode's slice)")
    p.add_argument("--warmup_skip", type=int, help="steps left out of the timing statistics (default: by mode)")
    p.add_argument("--seed", type=int, default=42, help="--seed and --data_seed of every run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch threads of every run")
    p.add_argument("--output_dir", help="where JSON, table and PNG go (default: benchmarks/results/<name>[_quick])")
    p.add_argument("--data_dir", type=Path, default=DATA, help="the shared data folder (default: ../shared/data)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    return p


def require_data(data_dir: Path, name: str, files=("train.jsonl", "validation.jsonl")) -> Path:
    """``data_dir/name``, or exit 0 with a clear reason when it is absent (as the tests skip)."""
    folder = Path(data_dir) / name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        print(f"SKIPPED: {folder} lacks {', '.join(missing)}; the benchmarks read the shared data "
              f"(../shared/data, or --data_dir).", flush=True)
        raise SystemExit(0)
    return folder


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


def parse_lr_grid(spec: str, default_grids: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    """``'default'`` or ``'adamw_torch=2e-5,5e-5;adahessian_h1=1e-2,3e-2'`` -> {name: [lr, ...]}."""
    if spec == "default":
        return {n: default_grids[n] for n in names}
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


# ----------------------------------------------------------------------------- runs


def run_child(name: str, cmd: list[str], env: dict, out_dir: Path, timeout: int) -> dict:
    """Run one optimizer in its own process; return the JSON record the runner wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}.log"
    result = out_dir / f"{name}.json"
    result.unlink(missing_ok=True)
    full = [sys.executable, str(RUNNER), "--result", str(result), *cmd]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(full)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(full, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    record = json.loads(result.read_text()) if result.exists() else {}
    record.update(name=name, returncode=rc, process_wall_s=round(wall, 2), log=str(log), command=shlex.join(full))
    if rc != 0:
        record["error_tail"] = log.read_text(errors="replace").splitlines()[-25:]
        print(f"  FAILED (rc={rc}); see {log}; it ends:\n    " + "\n    ".join(record["error_tail"][-3:]), flush=True)
    return record


def _weighted_median(times: list[float], hessian: list[bool], skip: int, interval: int | None) -> dict:
    kept = list(zip(times, hessian))[skip:]
    h_t = [t for t, h in kept if h] or [t for t, h in zip(times, hessian) if h]
    p_t = [t for t, h in kept if not h] or [t for t, h in zip(times, hessian) if not h]
    frac_h = 0.0 if not interval else 1.0 / interval
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
    weighted by how often that kind occurs (1/interval with a Hessian): for AdamW and
    interval 1 it is the plain median; for interval N it is the amortised cost of one
    Hessian step and N-1 plain ones, without letting one slow outlier (another process on
    the cores) move it. A kind with no step after the warm-up (quick runs) uses all its
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


def add_ratios(records: list[dict], metric: str, baseline: str = BASELINE) -> None:
    """Ratios (metric: difference) to the baseline optimizer's run in the same invocation."""
    base = next((r for r in records if r.get("optimizer") == baseline and r.get("returncode") == 0), None)
    for r in records:
        if base is None or r.get("returncode") != 0:
            continue
        t, bt = r["step_time"]["seconds_per_step"], base["step_time"]["seconds_per_step"]
        c, bc = r["step_time"].get("cpu_seconds_per_step"), base["step_time"].get("cpu_seconds_per_step")
        r["ratios"] = {
            "time_per_step": t / bt,
            "cpu_time_per_step": c / bc if c and bc else None,
            "peak_rss": r["peak_rss_train_mb"] / base["peak_rss_train_mb"],
            "rss_increment": r["rss_increment_mb"] / base["rss_increment_mb"] if base["rss_increment_mb"] > 0 else None,
            metric: r["metric"] - base["metric"] if None not in (r.get("metric"), base.get("metric")) else None,
        }


# ----------------------------------------------------------------------------- output


def fmt(x, spec=".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(records: list[dict], metric: str, metric_label: str) -> str:
    headers = ["optimizer", "lr", "Hessian every", "steps", f"dev {metric_label}", f"Δ{metric_label} vs AdamW",
               "s/step", "× AdamW", "CPU s/step × AdamW", "peak RSS MB", "× AdamW", "train Δ RSS MB", "× AdamW",
               "loss, last 10 steps"]
    rows = []
    for r in records:
        if r.get("returncode") != 0:
            rows.append([r["name"], fmt(r.get("lr"), "g"), "", "", f"FAILED (rc={r.get('returncode')})"]
                        + [""] * (len(headers) - 5))
            continue
        st, ra = r["step_time"], r.get("ratios", {})
        losses = r.get("losses") or []
        rows.append([
            r["name"], fmt(r["lr"], "g"), fmt(r.get("hessian_interval"), "d") if r.get("hessian_interval") else "–",
            r["steps"], fmt(r.get("metric"), ".4f" if metric == "accuracy" else ".2f"),
            fmt(ra.get(metric), "+.4f" if metric == "accuracy" else "+.2f"),
            fmt(st["seconds_per_step"]), fmt(ra.get("time_per_step"), ".2f"), fmt(ra.get("cpu_time_per_step"), ".2f"),
            fmt(r["peak_rss_train_mb"], ".0f"), fmt(ra.get("peak_rss"), ".2f"),
            fmt(r["rss_increment_mb"], ".0f"), fmt(ra.get("rss_increment"), ".2f"),
            fmt(statistics.fmean(losses[-10:]) if losses else None, ".3f"),
        ])
    return markdown_table(headers, rows)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def plot_losses(records: list[dict], path: Path, title: str, smooth: int = 10) -> None:
    """Training loss against steps and against wall-clock seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in records:
        losses = r.get("losses")
        if r.get("returncode") != 0 or not losses:
            continue
        k = max(1, min(smooth, len(losses) // 5))
        smoothed = [statistics.fmean(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        steps = list(range(1, len(losses) + 1))
        label = f"{r['name']} (lr {r['lr']:g})"
        ax_s.plot(steps, smoothed, label=label)
        ax_t.plot(r["wall_s"], smoothed, label=label)
    ax_s.set_xlabel("optimizer step")
    ax_t.set_xlabel("wall-clock seconds since training began")
    for ax in (ax_s, ax_t):
        ax.set_ylabel(f"training loss (running mean of ≤{smooth} steps)")
        ax.grid(alpha=0.3)
    if ax_s.lines:
        ax_s.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(name: str, out_dir: Path, records: list[dict], metric: str, metric_label: str, meta: dict,
           lr_search: bool) -> None:
    """Ratios, table, JSON, PNG; the table is printed and saved next to the JSON."""
    meta["machine"]["load_average_at_end"] = os.getloadavg()
    if lr_search:
        for r in records:
            r.setdefault("ratios", {})
        best = {}
        for r in records:
            if r.get("returncode") == 0 and r.get("metric") is not None:
                b = best.get(r["optimizer"])
                if b is None or r["metric"] > b["metric"]:
                    best[r["optimizer"]] = {"lr": r["lr"], "metric": r["metric"]}
        meta["best_lr"] = best
    else:
        add_ratios(records, metric)
    table = results_table(records, metric, metric_label)
    if lr_search:
        table += "\n\nbest lr per optimizer (by dev " + metric_label + "): " + ", ".join(
            f"{k}: {v['lr']:g} ({v['metric']:.4g})" for k, v in meta["best_lr"].items())
    heading = f"## {name}{' (quick)' if meta['quick'] else ''}{' lr search' if lr_search else ''}"
    text = f"{heading}\n\n{table}\n"
    print("\n" + text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text)
    write_json(out_dir / "results.json", {**meta, "runs": records})
    plot_losses(records, out_dir / "loss.png", f"{name}: training loss" + (" (quick)" if meta["quick"] else ""))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'table.md'}, {out_dir / 'loss.png'}", flush=True)


# ----------------------------------------------------------------------------- optimizers

# Peers run in runner.py's plain loop; "hessian_interval" says on which steps the loop calls
# backward(create_graph=True) (steps 0, N, 2N, ...: the steps on which each of them estimates).
PEERS = {
    # torch-optimizer 0.3: a Hessian on every step(), no interval option; defaults hessian_power=0.5, eps=1e-4.
    "torch_optimizer_adahessian": {"class": "torch_optimizer.Adahessian", "kwargs": {}, "hessian_interval": 1},
    # pytorch-optimizer 4.x: update_period=1 is its default; hessian_power=1, eps=1e-16.
    "pytorch_optimizer_adahessian": {"class": "pytorch_optimizer.AdaHessian", "kwargs": {"update_period": 1},
                                     "hessian_interval": 1},
    # SophiaH at AdaHessian's frequency, and at its own default (update_period=10).
    "sophiah_h1": {"class": "pytorch_optimizer.SophiaH", "kwargs": {"update_period": 1}, "hessian_interval": 1},
    "sophiah_h10": {"class": "pytorch_optimizer.SophiaH", "kwargs": {"update_period": 10}, "hessian_interval": 10},
    # Control: this package's AdaHessian in the same plain loop (standalone backward(create_graph=True) path),
    # to separate the optimizer's cost from the Trainer's overhead.
    "adahessian_loop_h1": {"class": "hf_adahessian.AdaHessian",
                           "kwargs": {"hessian_interval": 1, "block_size": 32, "seed": 0}, "hessian_interval": 1},
}


def trainer_optimizer(interval: int | None = None, extra: str = "", block_size: int = 32) -> dict:
    """A Trainer-path optimizer: AdaHessian with this Hessian interval, or AdamW when None."""
    if interval is None:
        return {"optim": ["--optim", "adamw_torch"], "hessian_interval": None}
    optim_args = f"hessian_interval={interval},block_size={block_size}" + (f",{extra}" if extra else "")
    return {"optim": ["--optim", "adahessian", "--optim_args", optim_args], "hessian_interval": interval}


def optimizer_args(spec: dict) -> tuple[list[str], list[str]]:
    """(runner options, script options) for one optimizer spec."""
    if "loop" in spec:
        loop = {k: spec["loop"][k] for k in ("class", "kwargs", "hessian_interval")}
        # The script still needs some --optim to build its arguments; the loop never uses it.
        return ["--loop", json.dumps(loop)], ["--optim", "adamw_torch"]
    return [], list(spec["optim"])


def run_experiment(title: str, script: str, args, registry: dict, budget: dict, script_args, metric_key: str,
                   metric: str, metric_label: str, out_dir: Path, extra_meta: dict | None = None) -> list[dict]:
    """Every chosen optimizer (or every (optimizer, lr) of the grid) in its own process, then the report."""
    names = pick_optimizers(args.optimizers, list(registry))
    lrs = {n: registry[n]["lr"] for n in names}
    lrs.update({k: v for k, v in parse_lr_overrides(args.lr).items() if k in lrs})
    if args.lr_grid:
        grids = parse_lr_grid(args.lr_grid, {n: registry[n]["grid"] for n in registry}, names)
        plan = [(n, lr) for n, grid in grids.items() for lr in grid]
    else:
        plan = [(n, lrs[n]) for n in names]
    env = bench_env(args.threads)
    meta = {
        "benchmark": title, "quick": args.quick, "lr_search": bool(args.lr_grid), "budget": budget,
        "machine": machine_info(args.threads), "invocation": shlex.join([sys.executable, *sys.argv]),
        "seed": args.seed, **(extra_meta or {}),
    }
    records = []
    for name, lr in plan:
        spec = registry[name]
        run_name = f"{name}_lr{lr:g}" if args.lr_grid else name
        runner_opts, optim_opts = optimizer_args(spec)
        run_dir = out_dir / "runs" / run_name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh Trainer output folder: no resuming, no refusal
        cmd = [*runner_opts, "--", script, *script_args(run_dir),
               *optim_opts, "--learning_rate", f"{lr:g}"]
        record = run_child(run_name, cmd, env, out_dir / "runs" / "logs", args.timeout)
        record.update(optimizer=name, lr=lr, hessian_interval=spec.get("hessian_interval") or
                      spec.get("loop", {}).get("hessian_interval"), path="plain loop" if "loop" in spec else "Trainer")
        if record.get("returncode") == 0:
            record["steps"] = len(record["step_times"])
            record["step_time"] = step_time_stats(record, budget["warmup_skip"], record["hessian_interval"])
            record["metric"] = record.get("eval_metrics", {}).get(metric_key)
            print(f"  done in {record['process_wall_s']:.0f}s: {record['step_time']['seconds_per_step']:.3f} s/step, "
                  f"peak RSS {record['peak_rss_train_mb']:.0f} MB, dev {metric_label} {record['metric']}", flush=True)
        records.append(record)
        write_json(out_dir / "results.partial.json", {**meta, "runs": records})
    base_fp = next((r.get("fingerprints") for r in records if r.get("optimizer") == BASELINE), None)
    for r in records:
        r["same_batches_as_adamw"] = (r.get("fingerprints") == base_fp) if base_fp and r.get("fingerprints") else None
    finish(title, out_dir, records, metric, metric_label, meta, lr_search=bool(args.lr_grid))
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    return records


def resolve_budget(args, budgets: dict) -> dict:
    """The mode's budget (quick, search for ``--lr_grid``, else full), with the command line's overrides."""
    budget = dict(budgets["quick" if args.quick else "search" if args.lr_grid else "full"])
    for key, flag in (("max_steps", args.max_steps), ("train_samples", args.max_train_samples),
                      ("eval_samples", args.max_eval_samples), ("warmup_skip", args.warmup_skip)):
        if flag is not None:
            budget[key] = flag
    return budget


def data_files(args, data: Path, budget: dict) -> tuple[Path, Path]:
    """The training and validation files the runs read: in quick mode, slices cut on disk
    (no tokenizing of the whole set per run), with a datasets cache the children inherit."""
    train, valid = data / "train.jsonl", data / "validation.jsonl"
    if args.quick:
        tmp = quick_data_dir()
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets_cache")
        train = write_slice(train, tmp / "train.jsonl", budget["train_samples"])
        valid = write_slice(valid, tmp / "validation.jsonl", budget["eval_samples"])
    return train, valid


def default_out_dir(args, name: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir).resolve()
    # Never a bare "sst2/" or "multi30k/": those names are the data's, which stay out of the repo.
    suffix = "_quick" if args.quick else "_lr_search" if args.lr_grid else "_full"
    return HERE / "results" / f"{name}{suffix}"


def schedule_args(args, budget: dict, warmup: int, run_dir) -> list[str]:
    """The script flags every benchmark run shares: budget, schedule, seeds, no saving, quiet logging."""
    a = [
        "--output_dir", str(run_dir),
        "--max_steps", str(budget["max_steps"]), "--lr_scheduler_type", "linear", "--warmup_steps", str(warmup),
        "--seed", str(args.seed), "--data_seed", str(args.seed),
        "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", str(max(1, budget["max_steps"] // 10)),
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
    ]
    # The quick mode's slices are already cut on disk.
    if budget["train_samples"] and not args.quick:
        a += ["--max_train_samples", str(budget["train_samples"])]
    if budget["eval_samples"] and not args.quick:
        a += ["--max_eval_samples", str(budget["eval_samples"])]
    return a


def write_slice(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` lines of a JSON-lines file (quick mode: no tokenizing of the whole set).

    Written to a temporary folder (``quick_data_dir``), never into the project: the data
    stays beside it, in ../shared/data.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return dst


def quick_data_dir() -> Path:
    """A temporary folder for quick mode's data slices, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="hf-adahessian-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
