"""What one child process measures: the :class:`Recorder` the instrumented Trainer and the plain loop write to.

* every optimizer step: wall-clock seconds (``perf_counter``), CPU seconds of the
  process (``process_time``), whether it carried a Hessian, its training loss, the
  training clock at its end, and (first 50 steps) a fingerprint of its batch;
* RSS at the start, right after the model is loaded, when the Trainer is built
  (data tokenized too), and the peak RSS (``getrusage``) before and after training;
* every evaluation: its metrics, the step, and the training clock at that point.

The training clock is wall-clock seconds since training began less the time spent in
evaluations during training, so that evaluating every K steps (time to quality)
does not count as training time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import time
from dataclasses import dataclass, field

FINGERPRINT_STEPS = 50


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fingerprint(inputs) -> str:
    h = hashlib.sha1()
    for key in ("input_ids", "labels"):
        t = inputs.get(key) if hasattr(inputs, "get") else None
        if t is not None:
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass
class Recorder:
    step_times: list[float] = field(default_factory=list)
    step_cpu_times: list[float] = field(default_factory=list)
    hessian: list[bool] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)  # the training clock at each step's end
    fingerprints: list[str] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)  # plain loop: seconds per phase of each step
    evaluations: list[dict] = field(default_factory=list)
    rss_start_mb: float = field(default_factory=rss_mb)
    rss_after_model_load_mb: float | None = None
    rss_at_trainer_init_mb: float | None = None
    peak_rss_at_trainer_init_mb: float | None = None
    rss_train_begin_mb: float | None = None
    peak_rss_before_train_mb: float | None = None
    peak_rss_train_mb: float | None = None
    rss_increment_mb: float | None = None
    peak_rss_final_mb: float | None = None
    train_wall_s: float | None = None
    eval_s_during_training: float = 0.0
    optimizer_counters: dict | None = None
    output_dir: str | None = None
    # Private clocks, not part of the record.
    _t0: float | None = field(default=None, repr=False)
    _step_t: float = field(default=0.0, repr=False)
    _step_cpu: float = field(default=0.0, repr=False)
    _eval_t: float | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ memory
    def model_loaded(self) -> None:
        self.rss_after_model_load_mb = rss_mb()

    def trainer_built(self) -> None:
        self.rss_at_trainer_init_mb = rss_mb()
        self.peak_rss_at_trainer_init_mb = peak_rss_mb()

    # ------------------------------------------------------------------ training
    def train_begin(self) -> None:
        self.rss_train_begin_mb = rss_mb()
        self.peak_rss_before_train_mb = peak_rss_mb()
        self._t0 = time.perf_counter()

    def clock(self) -> float:
        """Seconds of training so far, evaluations during training left out."""
        if self._t0 is None:
            return 0.0
        return time.perf_counter() - self._t0 - self.eval_s_during_training

    def batch(self, inputs) -> None:
        if len(self.fingerprints) < FINGERPRINT_STEPS:
            self.fingerprints.append(fingerprint(inputs))

    def step_begin(self) -> None:
        self._step_cpu = time.process_time()
        self._step_t = time.perf_counter()

    def step_end(self, hessian: bool, loss: float | None = None, phases: dict[str, float] | None = None) -> None:
        self.step_times.append(time.perf_counter() - self._step_t)
        self.step_cpu_times.append(time.process_time() - self._step_cpu)
        self.hessian.append(bool(hessian))
        self.wall_s.append(self.clock())
        if loss is not None:
            self.losses.append(loss)
        if phases is not None:
            self.phases.append(phases)

    def train_end(self, counters: dict | None = None) -> None:
        self.peak_rss_train_mb = peak_rss_mb()
        load = self.rss_after_model_load_mb or self.rss_at_trainer_init_mb or self.rss_start_mb
        self.rss_increment_mb = self.peak_rss_train_mb - load
        self.train_wall_s = self.clock()
        self._t0 = None
        if counters is not None:
            self.optimizer_counters = dict(counters)

    @property
    def training(self) -> bool:
        return self._t0 is not None

    # ------------------------------------------------------------------ evaluation
    def eval_begin(self) -> None:
        self._eval_t = time.perf_counter()

    def eval_end(self, step: int, metrics: dict) -> None:
        seconds = time.perf_counter() - self._eval_t
        during = self.training
        train_s = self.clock() if during else self.train_wall_s
        if during:
            self.eval_s_during_training += seconds
            train_s -= seconds  # the clock at the evaluation's start
        self.evaluations.append({"step": step, "train_s": train_s, "eval_s": seconds, "during_training": during,
                                 "metrics": dict(metrics)})

    @property
    def final_metrics(self) -> dict:
        """The last evaluation's metrics (the script's own, after training)."""
        return self.evaluations[-1]["metrics"] if self.evaluations else {}

    # ------------------------------------------------------------------ output
    def finish(self) -> None:
        self.peak_rss_final_mb = peak_rss_mb()

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["eval_metrics"] = self.final_metrics
        return out
