"""Typed specs of what a benchmark runs: optimizers, metric, budgets, the experiment.

An :class:`OptimizerSpec` spells out every knob of the optimizer it names: an AdaHessian
spec lists every ``--optim_args`` key the package accepts (``hf_adahessian.arguments.OPTIM_ARGS``,
read from ``AdaHessian.__init__``'s signature), so a default that changes in the library
does not change what a benchmark runs. Its name says every knob that differs from
:data:`NAME_REFERENCE` (the optimizer's defaults when the names were fixed; a key the
library adds later is referenced to its default then): the names are made from the knobs
by :func:`adahessian` and :func:`adahessian_loop`, so they cannot drift apart.
``adahessian_h1_p05_b32`` is ``hessian_interval=1,hessian_power=0.5,block_size=32``, the
rest at the reference.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

BASELINE = "adamw_torch"

# The values a name leaves unsaid (in the order the suffixes are written), and the suffix
# that says any other value; hessian_interval is always said, as _h<N>.
NAME_REFERENCE: dict[str, Any] = {
    "hessian_power": 1.0,
    "block_size": 1,
    "hessian_batch_fraction": 1.0,
    "n_samples": 1,
    "eps": 1e-4,
    "hessian_estimator": "exact",
    "hessian_chunks": 1,
    "hessian_warmup": 0,
    "hessian_warmup_interval": 1,
    "stale_guard": False,
    "stale_guard_reference": "last",
    "min_row_estimates": 1,
    "update_clip": None,
    "time_weighted": False,
    "clip_hessian": False,
    "fd_scheme": "forward",
    "fd_step": None,
    "average_conv_kernel": True,
    "foreach": None,
    "fused": None,
}
_SUFFIX = {
    "hessian_power": lambda v: "p" + f"{v:g}".replace(".", ""),
    "block_size": lambda v: f"b{v}",
    "hessian_batch_fraction": lambda v: f"f{round(100 * v)}",
    "n_samples": lambda v: f"n{v}",
    "eps": lambda v: f"eps{v:g}",
    "hessian_estimator": lambda v: {"finite_difference": "fd"}.get(v, v),
    "hessian_chunks": lambda v: "cauto" if v is None else f"c{v}",
    "hessian_warmup": lambda v: f"w{v}",
    "hessian_warmup_interval": lambda v: f"i{v}",
    "stale_guard": lambda v: "sg" if v else "nosg",
    "stale_guard_reference": lambda v: f"sg{v[0]}",
    "min_row_estimates": lambda v: f"r{v}",
    "update_clip": lambda v: f"uc{v:g}",
    "time_weighted": lambda v: "tw" if v else "notw",
    "clip_hessian": lambda v: "ch" if v else "noch",
    "fd_scheme": lambda v: f"fd{v}",
    "fd_step": lambda v: f"fds{v:g}",
    "average_conv_kernel": lambda v: "conv" if v else "noconv",
    "foreach": lambda v: "foreach" if v else "noforeach",
    "fused": lambda v: "fused" if v else "nofused",
}
# Trainer-side keys: not the optimizer's, so not the plain loop's.
TRAINER_KEYS = ("hessian_batch_fraction", "hessian_chunks")


@dataclass(frozen=True)
class Metric:
    """The dev-set number a benchmark compares: where it is read in the script's eval metrics, how to show it.

    ``key`` is the eval metrics' key it is read from; ``transform`` (a name, so the spec stays
    JSON) what is made of that value: ``"exp"`` turns ``eval_loss`` into perplexity (the
    recorder sees ``trainer.evaluate()``'s dict, which has no perplexity). ``higher_is_better``
    decides every comparison of the harness (best lr, reaching AdamW's final value, better or
    worse); ``log_scale`` plots the dev curve on a log axis.
    """

    key: str  # e.g. "eval_accuracy"
    label: str  # e.g. "accuracy"
    higher_is_better: bool = True
    format: str = ".4f"
    transform: Literal["exp"] | None = None
    log_scale: bool = False

    def __post_init__(self):
        if self.transform not in (None, "exp"):
            raise ValueError(f"metric {self.label}: unknown transform {self.transform!r}")

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """This metric from an evaluation's metrics (None where the key is absent)."""
        raw = (metrics or {}).get(self.key)
        if raw is None or self.transform is None:
            return raw
        # exp overflows past ~709; a diverged run's perplexity is infinite (as run_clm.py writes it).
        return math.exp(raw) if raw < 700 else math.inf

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def at_least(self) -> str:
        """The sign of "as good as": ≥ when higher is better, ≤ when lower is."""
        return "≥" if self.higher_is_better else "≤"

    def show(self, value: float | None, signed: bool = False) -> str:
        if value is None:
            return "–"
        return format(value, ("+" if signed else "") + self.format)

    def better_or_equal(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than


@dataclass(frozen=True)
class Budget:
    """Optimizer steps, training and dev examples (None: all), steps left out of the timing."""

    max_steps: int
    train_samples: int | None
    eval_samples: int | None
    warmup_skip: int


@dataclass(frozen=True)
class Budgets:
    quick: Budget
    full: Budget
    search: Budget


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of a benchmark.

    ``path="trainer"``: the script's Trainer with ``--optim optim --optim_args optim_args``.
    ``path="loop"``: the plain loop (``plain_loop.py``) with ``peer_class(params, lr=...,
    **peer_kwargs)``; ``seed_kwarg`` names the keyword through which the run's ``--seed``
    reaches it (as the Trainer passes ``args.seed`` to AdaHessian), None for none.
    ``hessian_interval``: the steps that carry a Hessian (0, N, 2N, …), None for none.
    """

    name: str
    lr: float
    grid: tuple[float, ...]
    path: Literal["trainer", "loop"]
    hessian_interval: int | None
    optim: str | None = None
    optim_args: Mapping[str, Any] = field(default_factory=dict)
    peer_class: str | None = None
    peer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed_kwarg: str | None = None
    # The script's own flags this row adds (``--use_peft ...``): a setting of the model, not the optimizer.
    script_extra: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        if self.path == "trainer" and (self.optim is None or self.peer_class is not None):
            raise ValueError(f"{self.name}: a Trainer optimizer needs optim and no peer_class")
        if self.path == "loop" and (self.peer_class is None or self.optim is not None or self.optim_args):
            raise ValueError(f"{self.name}: a loop optimizer needs peer_class and no optim/optim_args")
        own = {**self.optim_args, **self.peer_kwargs}
        period = own.get("update_period", own.get("hessian_interval"))
        if period is not None and period != self.hessian_interval:
            raise ValueError(f"{self.name}: hessian_interval {self.hessian_interval} but the optimizer's is {period}")
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "script_extra", tuple(self.script_extra))
        if self.script_extra and self.path != "trainer":
            raise ValueError(f"{self.name}: script flags need the script's Trainer (path='trainer')")

    def script_args(self) -> list[str]:
        """The script's optimizer flags (a loop run still needs some --optim; the loop never uses it)."""
        if self.path == "loop":
            return ["--optim", "adamw_torch"]
        args = ["--optim", self.optim]
        if self.optim_args:
            args += ["--optim_args", ",".join(f"{k}={_value(v)}" for k, v in self.optim_args.items())]
        return args + list(self.script_extra)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "OptimizerSpec":
        return cls(**d)


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class Experiment:
    """A comparison's fixed parts: the script and its own arguments, the metric, the budgets.

The optimizers are the benchmark's registry (``specs.registry``), planned into runs
by ``comparison.plan`` before the experiment is built.

    ``script_args`` are the script's task arguments (model, data, lengths, batch sizes);
    ``runs.schedule_args`` adds the budget, the seed and the output folder of each run.
    """

    name: str  # the results folder: benchmarks/results/<name>/
    title: str
    script: str  # repository-relative: run_glue.py
    metric: Metric
    budgets: Budgets
    script_args: tuple[str, ...]


def registry(*specs: OptimizerSpec) -> dict[str, OptimizerSpec]:
    names = [s.name for s in specs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"optimizer names used twice: {sorted(duplicates)}")
    return {s.name: s for s in specs}


# ----------------------------------------------------------------------------- constructors


def library_knobs() -> dict[str, Any]:
    """Every ``--optim_args`` key of the installed package with its default, in the naming order."""
    from hf_adahessian.arguments import OPTIM_ARGS

    defaults = {k: default for k, (_kind, default) in OPTIM_ARGS.items() if k != "hessian_interval"}
    order = [k for k in NAME_REFERENCE if k in defaults] + [k for k in defaults if k not in NAME_REFERENCE]
    return {k: defaults[k] for k in order}


def _knobs(given: Mapping[str, Any], drop=()) -> dict[str, Any]:
    """Every knob: the given ones, the rest at the name's reference (or the library's default)."""
    library = library_knobs()
    unknown = set(given) - set(library)
    if unknown:
        raise ValueError(f"unknown AdaHessian knobs {sorted(unknown)}; the package accepts {sorted(library)}")
    return {k: given.get(k, NAME_REFERENCE.get(k, default)) for k, default in library.items() if k not in drop}


def _suffixes(knobs: Mapping[str, Any]) -> str:
    library = library_knobs()
    parts = []
    for k, v in knobs.items():
        if v != NAME_REFERENCE.get(k, library.get(k)):
            parts.append(_SUFFIX[k](v) if k in _SUFFIX else f"{k}{v}")
    return "".join(f"_{p}" for p in parts)


def adamw(lr: float, grid, optim: str = BASELINE) -> OptimizerSpec:
    """AdamW through the Trainer's ``--optim``, named by it: ``adamw_torch`` is every comparison's baseline,
    ``adamw_torch_fused`` (transformers 5's default) the same update in one fused kernel."""
    return OptimizerSpec(optim, lr, grid, "trainer", None, optim=optim)


def adahessian(interval: int, lr: float, grid, note: str = "", **knobs) -> OptimizerSpec:
    """``--optim adahessian`` with every knob explicit; the name says the ones off the reference."""
    all_knobs = _knobs(knobs)
    name = f"adahessian_h{interval}" + _suffixes(all_knobs)
    return OptimizerSpec(name, lr, grid, "trainer", interval, optim="adahessian",
                         optim_args={"hessian_interval": interval, **all_knobs}, note=note)


# LoRA as the benchmarks run it: run_glue.py's --use_peft (TRL's flag names) on the attention's query and value.
LORA_FLAGS = ("--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
              "--lora_target_modules", "query", "value")


def lora(spec: OptimizerSpec, lr: float, grid, note: str = "") -> OptimizerSpec:
    """``spec`` training LoRA adapters (and the new head) instead of the whole model: ``<name>_lora``."""
    return dataclasses.replace(spec, name=f"{spec.name}_lora", lr=lr, grid=tuple(grid),
                               script_extra=spec.script_extra + LORA_FLAGS, note=note)


def with_beta2(spec: OptimizerSpec, beta2: float, note: str = "") -> OptimizerSpec:
    """``spec`` with v's decay at ``beta2`` (the Trainer's ``--adam_beta2``): ``<name>_beta2_<beta2>``.

    The lazy schedules update v only on Hessian steps, so at 0.999 v̂ is close to the plain mean of
    every estimate since the first (fine-tuning's earliest, taken while the head was random, among
    them); a smaller β2 forgets them within about 1/(1 − β2) estimates."""
    return dataclasses.replace(spec, name=f"{spec.name}_beta2_{beta2:g}",
                               script_extra=spec.script_extra + ("--adam_beta2", f"{beta2:g}"),
                               note=note or spec.note)


def adahessian_loop(interval: int, lr: float, grid, note: str = "", **knobs) -> OptimizerSpec:
    """This package's AdaHessian in the plain loop (standalone ``backward(create_graph=True)`` path)."""
    if set(knobs) & set(TRAINER_KEYS):
        raise ValueError(f"{sorted(set(knobs) & set(TRAINER_KEYS))} belong to the Trainer path")
    all_knobs = _knobs(knobs, drop=TRAINER_KEYS)
    name = f"adahessian_loop_h{interval}" + _suffixes(all_knobs)
    return OptimizerSpec(name, lr, grid, "loop", interval, peer_class="hf_adahessian.AdaHessian",
                         peer_kwargs={"hessian_interval": interval, **all_knobs}, seed_kwarg="seed", note=note)


def peer(name: str, peer_class: str, interval: int, lr: float, grid, note: str = "", **kwargs) -> OptimizerSpec:
    """Another package's optimizer in the plain loop; ``kwargs`` spell out its Hessian knobs."""
    return OptimizerSpec(name, lr, grid, "loop", interval, peer_class=peer_class, peer_kwargs=kwargs, note=note)


# The peers at their packages' own defaults, written out (torch-optimizer 0.3, pytorch-optimizer 4.1).
def torch_optimizer_adahessian(lr: float, grid) -> OptimizerSpec:
    # A Hessian on every step(); no interval option.
    return peer("torch_optimizer_adahessian", "torch_optimizer.Adahessian", 1, lr, grid,
                hessian_power=0.5, eps=1e-4)


def pytorch_optimizer_adahessian(lr: float, grid) -> OptimizerSpec:
    return peer("pytorch_optimizer_adahessian", "pytorch_optimizer.AdaHessian", 1, lr, grid,
                update_period=1, hessian_power=1.0, num_samples=1, hessian_distribution="rademacher", eps=1e-16)


def sophiah(interval: int, lr: float, grid) -> OptimizerSpec:
    # update_period=10 is SophiaH's own default; 1 is AdaHessian's frequency.
    return peer(f"sophiah_h{interval}", "pytorch_optimizer.SophiaH", interval, lr, grid,
                update_period=interval, p=0.01, num_samples=1, hessian_distribution="gaussian", eps=1e-12)


def from_scratch_registry(adamw_lr: float, adamw_grid, lr: float, grid, sophia_lr: float, sophia_grid,
                          h1_note: str = "", h20: tuple[float, tuple] | None = None,
                          h20_clip_hessian: tuple[float, tuple] | None = None) -> dict[str, OptimizerSpec]:
    """The registry of a transformer trained from scratch (Multi30k, the LM): AdamW (both kernels); AdaHessian with the
    authors' transformer recipe (|D| averaged over blocks of 32) at intervals 1 and 10 and by finite
    differences, the lazy rows at ``adahessian_h1_b32``'s lr (the every-20 schedule after 15 dense steps at
    ``h20``'s (lr, grid) where the task searched it on its own, and with ``clip_hessian`` at
    ``h20_clip_hessian``'s); the peers and the plain-loop control."""
    h20_lr, h20_grid = h20 or (lr, grid)
    ch_lr, ch_grid = h20_clip_hessian or (h20_lr, h20_grid)
    followed = "lr not searched: adahessian_h1_b32's"
    clipped = adahessian(20, ch_lr, ch_grid, block_size=32, hessian_warmup=15, stale_guard=True,
                         stale_guard_reference="average", clip_hessian=True, hessian_estimator="finite_difference",
                         note="lr searched on its own grid" if h20_clip_hessian else "the row without clip_hessian's lr")
    return registry(
        adamw(adamw_lr, adamw_grid),
        adamw(adamw_lr, adamw_grid, optim="adamw_torch_fused"),
        adahessian(1, lr, grid, block_size=32, note=h1_note),
        adahessian(10, lr, grid, block_size=32, note=followed),
        adahessian(1, lr, grid, block_size=32, hessian_estimator="finite_difference", note=followed),
        # adahessian_h1_b32's estimate in chunks: the exact estimate in bounded memory (None: the trainer's
        # default, hessian_chunks=auto).
        *(adahessian(1, lr, grid, block_size=32, hessian_chunks=chunks, note="adahessian_h1_b32's estimate, in chunks")
          for chunks in (4, 8, None)),
        # The Hessian on 1/16 of each batch every step, by forward differences, and exactly.
        adahessian(1, lr, grid, block_size=32, hessian_batch_fraction=0.0625, hessian_estimator="finite_difference",
                   note=followed),
        adahessian(1, lr, grid, block_size=32, hessian_batch_fraction=0.0625, note=followed),
        # Interval 10 after 15 dense steps, on 1/16 by forward differences: AdamW's memory and about its time.
        adahessian(10, lr, grid, block_size=32, hessian_warmup=15, stale_guard=True, note=followed),
        *(adahessian(10, lr, grid, block_size=32, hessian_warmup=15, hessian_batch_fraction=0.0625,
                     hessian_estimator="finite_difference", note=followed, **lever)
          for lever in ({"stale_guard": True}, {"time_weighted": True})),
        # The same lazy schedule by forward differences on a quarter of the batch and on all of it: an
        # estimate that sees more of the batch, for a few percent more time.
        *(adahessian(10, lr, grid, block_size=32, hessian_warmup=15, stale_guard=True, hessian_batch_fraction=fraction,
                     hessian_estimator="finite_difference", note=followed)
          for fraction in (0.25, 1.0)),
        # The whole-batch forward differences with a shorter warm-up, or none: the stale guard alone.
        *(adahessian(10, lr, grid, block_size=32, hessian_warmup=warmup, stale_guard=True,
                     hessian_estimator="finite_difference", note=followed)
          for warmup in (0, 5)),
        # ... and with a Hessian every 20 steps after 15 or 10 dense ones: fewer Hessian steps for the time target.
        adahessian(20, h20_lr, h20_grid, block_size=32, hessian_warmup=15, stale_guard=True,
                   hessian_estimator="finite_difference", note="lr searched on its own grid" if h20 else followed),
        adahessian(20, lr, grid, block_size=32, hessian_warmup=10, stale_guard=True,
                   hessian_estimator="finite_difference", note=followed),
        # The every-20 schedule with the guard's average reference (v̂ put where a Hessian on every step has it).
        adahessian(20, h20_lr, h20_grid, block_size=32, hessian_warmup=15, stale_guard=True,
                   stale_guard_reference="average", hessian_estimator="finite_difference",
                   note="the lr of the row with the last-estimate guard"),
        # ... with the estimate clipped by the gradient's clip factor (clip_hessian), and with v forgetting
        # the early estimates (β2 per estimate) at that row's lr.
        clipped,
        # ... after 5 dense steps instead of 15: 9 fewer Hessian steps in 150 on SST-2.
        adahessian(20, ch_lr, ch_grid, block_size=32, hessian_warmup=5, stale_guard=True,
                   stale_guard_reference="average", clip_hessian=True, hessian_estimator="finite_difference",
                   note="the 15-step warm-up's lr"),
        # ... or 15 warm-up steps with a Hessian on every third: 5 warm-up estimates spread over the 15 steps.
        adahessian(20, ch_lr, ch_grid, block_size=32, hessian_warmup=15, hessian_warmup_interval=3, stale_guard=True,
                   stale_guard_reference="average", clip_hessian=True, hessian_estimator="finite_difference",
                   note="the 15-step warm-up's lr"),
        *(with_beta2(clipped, beta2, note="the row at β2 0.999's lr") for beta2 in (0.95, 0.9)),
        torch_optimizer_adahessian(lr, grid),
        pytorch_optimizer_adahessian(lr, grid),
        sophiah(1, sophia_lr, sophia_grid),
        sophiah(10, sophia_lr, sophia_grid),
        adahessian_loop(1, lr, grid, block_size=32),
    )


# The default rows of the from-scratch benchmarks.
FROM_SCRATCH_DEFAULT = (BASELINE, "adahessian_h1_b32", "adahessian_h10_b32")


def build_loop_optimizer(spec: OptimizerSpec, params, lr: float, seed: int):
    """The loop path's optimizer: ``peer_class(params, lr=lr, **peer_kwargs)`` (plus the run's seed)."""
    module, _, name = spec.peer_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(spec.peer_kwargs)
    if spec.seed_kwarg:
        kwargs[spec.seed_kwarg] = seed
    return cls(params, lr=lr, **kwargs)
