"""One child process per (optimizer, lr, seed): its command line, and running it.

Every run is its own process (``python -m benchmarks.runner``), so that its peak RSS is
its own; the parent only builds command lines, collects each child's JSON and compares.
Children run with the repository root as their working directory.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import REPO, arg_path, portable
from .specs import Budget, OptimizerSpec


@dataclass(frozen=True)
class Run:
    spec: OptimizerSpec
    lr: float
    seed: int
    lr_in_name: bool = False  # learning-rate search: one run per lr

    @property
    def name(self) -> str:
        return self.spec.name + (f"_lr{self.lr:g}" if self.lr_in_name else "") + f"_seed{self.seed}"


def schedule_args(budget: Budget, seed: int, run_dir: Path, eval_every: int | None, sliced: bool) -> list[str]:
    """The script flags every run shares: budget, schedule, seed, evaluation, no saving, quiet logging.

    ``sliced``: the data files are quick mode's slices, already cut on disk.
    """
    steps = budget.max_steps
    a = [
        "--output_dir", arg_path(run_dir),
        "--max_steps", str(steps), "--lr_scheduler_type", "linear", "--warmup_steps", str(warmup_steps(budget)),
        "--seed", str(seed), "--data_seed", str(seed),
        "--save_strategy", "no", "--logging_steps", str(max(1, steps // 10)),
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
    ]
    a += ["--eval_strategy", "steps", "--eval_steps", str(eval_every)] if eval_every else ["--eval_strategy", "no"]
    if budget.train_samples and not sliced:
        a += ["--max_train_samples", str(budget.train_samples)]
    if budget.eval_samples and not sliced:
        a += ["--max_eval_samples", str(budget.eval_samples)]
    return a


def warmup_steps(budget: Budget) -> int:
    """A linear warm-up over 10% of the steps (at least one)."""
    return max(1, round(0.1 * budget.max_steps))


def child_command(run: Run, script: str, script_args: list[str], result: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.runner", "--result", arg_path(result)]
    if run.spec.path == "loop":
        cmd += ["--loop", json.dumps(run.spec.to_json())]
    return cmd + ["--", script, *script_args, *run.spec.script_args(), "--learning_rate", f"{run.lr:g}"]


def run_child(run: Run, script: str, script_args: list[str], env: dict, runs_dir: Path, timeout: int) -> dict:
    """Run one (optimizer, lr, seed) in its own process; return the JSON record the runner wrote, completed."""
    logs = runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, result = logs / f"{run.name}.log", logs / f"{run.name}.json"
    result.unlink(missing_ok=True)
    cmd = child_command(run, script, script_args, result)
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {shlex.join(portable(cmd))}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    record = json.loads(result.read_text()) if result.exists() else {}
    record.update(name=run.name, optimizer=run.spec.name, lr=run.lr, seed=run.seed, returncode=rc,
                  hessian_interval=run.spec.hessian_interval, path=run.spec.path, spec=run.spec.to_json(),
                  process_wall_s=round(wall, 2), log=arg_path(log), command=shlex.join(cmd))
    if rc != 0:
        record["error_tail"] = log.read_text(errors="replace").splitlines()[-25:]
        print(f"  FAILED (rc={rc}); see {log}; it ends:\n    " + "\n    ".join(record["error_tail"][-3:]), flush=True)
    return record


def fresh_run_dir(runs_dir: Path, run: Run) -> Path:
    """The run's Trainer output folder, emptied: no resuming, no refusal to overwrite."""
    path = runs_dir / run.name
    shutil.rmtree(path, ignore_errors=True)
    return path
