"""Training arguments in which ``--optim adahessian`` parses, and AdaHessian's settings.

``TrainingArguments.optim`` is typed with transformers' closed ``OptimizerNames``
enum, so the subclasses widen that one field to an enum with every stock name
plus ``adahessian``; everything else (``--learning_rate``, ``--adam_beta1/2``,
``--weight_decay``, schedulers, checkpointing) stays the Trainer's own.

The ``--optim_args`` keys, their types and defaults come from
``AdaHessian.__init__``'s signature (less what the Trainer has flags for), plus
the keys that belong to the trainer; they are parsed once, when the arguments are
built, into a frozen :class:`AdaHessianSettings` that the trainer and the
optimizer both read.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import ExplicitEnum

from .optimizer import AdaHessian
from .validation import (
    AdaHessianUsageError,
    HyperparameterError,
    check,
    check_group_hyperparameters,
    check_int,
    check_optimizer_hyperparameters,
)

logger = logging.getLogger(__name__)

ADAHESSIAN = "adahessian"

AdaHessianOptimizerNames = ExplicitEnum(
    "AdaHessianOptimizerNames",
    {**{m.name: m.value for m in OptimizerNames}, "ADAHESSIAN": ADAHESSIAN},
)
AdaHessianOptimizerNames.__doc__ = "transformers' `OptimizerNames` plus `adahessian`."

# Constructor arguments the Trainer sets from its own flags: --learning_rate,
# --adam_beta1/2, --weight_decay (through its parameter groups) and --seed.
TRAINER_FLAGS = {"lr": "--learning_rate", "betas": "--adam_beta1/--adam_beta2", "weight_decay": "--weight_decay",
                 "seed": "--seed"}


def _optimizer_keys() -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(AdaHessian.__init__)
    keys = {}
    for name, parameter in inspect.signature(AdaHessian.__init__).parameters.items():
        if name in ("self", "params") or name in TRAINER_FLAGS:
            continue
        keys[name] = (hints[name], parameter.default)
    return keys


# key -> (type, default).  The trainer's own keys: estimate the Hessian on this share of
# each batch, and split a Hessian micro-batch into this many chunks for the double backward
# (None, written "auto": the rule of ``chunking.py``).
TRAINER_KEYS: dict[str, tuple[Any, Any]] = {"hessian_batch_fraction": (float, 1.0),
                                            "hessian_chunks": (typing.Optional[int], None)}
OPTIM_ARGS: dict[str, tuple[Any, Any]] = {**_optimizer_keys(), **TRAINER_KEYS}


@dataclass(frozen=True)
class AdaHessianSettings:
    """What ``--optim_args`` said, every key filled in: the optimizer's keyword arguments and the trainer's."""

    optimizer_items: tuple[tuple[str, Any], ...]
    hessian_batch_fraction: float = 1.0
    hessian_chunks: int | None = None  # None: auto

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        """``AdaHessian``'s keyword arguments from ``--optim_args`` (a fresh dict each time)."""
        return dict(self.optimizer_items)

    def __str__(self) -> str:
        items = {**self.optimizer_kwargs, **{k: getattr(self, k) for k in TRAINER_KEYS}}
        if items["hessian_chunks"] is None:
            items["hessian_chunks"] = "auto"
        return ",".join(f"{k}={v}" for k, v in items.items())


# ----------------------------------------------------------------------------- parsing


class SettingsError(AdaHessianUsageError):
    """A bad ``--optim_args`` or Trainer flag for AdaHessian: the message names it, the value and what is accepted."""


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _parse_pairs(optim_args: str | None) -> dict[str, str]:
    """``"a=1, b=2"`` -> ``{"a": "1", "b": "2"}``; no coercion."""
    accepted = ", ".join(OPTIM_ARGS)
    pairs: dict[str, str] = {}
    for item in (optim_args or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise SettingsError(f"--optim_args: {item!r} is not key=value; accepted keys for adahessian: {accepted}.")
        if not _KEY.match(key):
            raise SettingsError(f"--optim_args: {key!r} is not a key (no spaces or symbols inside a key); "
                                 f"accepted keys: {accepted}.")
        if key not in OPTIM_ARGS:
            raise SettingsError(f"--optim_args: unknown key {key!r} for adahessian; accepted keys: {accepted}.")
        if key in pairs:
            raise SettingsError(f"--optim_args: {key} is given twice ({key}={pairs[key]} and {key}={value}); "
                                 "give it once.")
        pairs[key] = value
    return pairs


def _coerce(key: str, value: str, kind) -> Any:
    """One string to the constructor's type for ``key`` (float, int, bool, Optional[...], Literal[...])."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value.lower() in ("none", "auto", "null"):
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Literal:
        if value not in args:
            raise SettingsError(f"--optim_args: {key}={value!r} is not one of {', '.join(args)}.")
        return value
    if kind is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise SettingsError(f"--optim_args: {key}={value!r} is not a boolean; use true or false.")
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"--optim_args: {key}={value!r} is not {'an integer' if kind is int else 'a number'}."
                             ) from None


def parse_optim_args(optim_args: str | None) -> AdaHessianSettings:
    """``"hessian_power=0.5,hessian_interval=10"`` -> settings with every key; types checked, ranges not."""
    pairs = _parse_pairs(optim_args)
    values = {key: _coerce(key, pairs[key], kind) if key in pairs else default
              for key, (kind, default) in OPTIM_ARGS.items()}
    trainer = {key: values.pop(key) for key in TRAINER_KEYS}
    return AdaHessianSettings(optimizer_items=tuple(values.items()), **trainer)


def _cli_message(err: HyperparameterError) -> str:
    flag = TRAINER_FLAGS.get(err.name)
    if flag is None:
        return f"--optim_args: {err}"
    return f"{flag}: invalid value {err.value!r} with --optim adahessian; expected {err.expected}."


def validate(settings: AdaHessianSettings, args: TrainingArguments) -> None:
    """The ranges of every setting, with the Trainer's own flags; one line naming the flag on failure."""
    kw = settings.optimizer_kwargs
    try:
        check_group_hyperparameters(args.learning_rate, (args.adam_beta1, args.adam_beta2), kw["eps"],
                                    args.weight_decay, kw["hessian_power"], kw["block_size"])
        check_optimizer_hyperparameters(kw["hessian_interval"], kw["n_samples"], kw["hessian_estimator"],
                                        kw["fd_scheme"], kw["fd_step"], kw["hessian_warmup"], kw["update_clip"],
                                        kw["min_row_estimates"], kw["stale_guard"], kw["stale_guard_reference"],
                                        kw["hessian_warmup_interval"])
        fraction = settings.hessian_batch_fraction
        check("hessian_batch_fraction", 0.0 < fraction <= 1.0, fraction, "a number in (0, 1]")
        if settings.hessian_chunks is not None:
            check_int("hessian_chunks", settings.hessian_chunks)
    except HyperparameterError as err:
        raise SettingsError(_cli_message(err)) from None
    if kw["hessian_estimator"] == "finite_difference" and (settings.hessian_chunks or 1) > 1:
        raise SettingsError(
            "--optim_args: hessian_chunks applies to the exact estimator (whose double-backward graph it bounds); "
            "the finite-difference one keeps no graph: drop it."
        )


def is_adahessian(args: TrainingArguments) -> bool:
    return str(getattr(args.optim, "value", args.optim)) == ADAHESSIAN


def settings_of(args: TrainingArguments) -> AdaHessianSettings:
    """The settings parsed when ``args`` was built (or parsed now, for arguments made otherwise)."""
    settings = getattr(args, "_adahessian_settings", None)
    if settings is None:
        settings = parse_optim_args(args.optim_args)
    return settings


# A learning rate below this is almost surely an Adam one: AdaHessian's step is
# m̂/√v̂ with v the Hessian's scale, so it wants learning rates ~100x larger.
ADAM_LIKE_LR = 1e-3
RECIPE_HINT = (
    "AdaHessian's update is normalised by the Hessian, so its learning rates are far larger "
    "than Adam's: the authors used 0.15 when training from scratch (with eps=1e-4, "
    "hessian_power=1, block_size=32 for transformers); for fine-tuning a pretrained BERT "
    "see the README's recipes."
)


@dataclass
class _AdaHessianArgumentsMixin:
    """Widens ``optim`` to accept ``adahessian`` and checks what AdaHessian cannot run with."""

    optim: AdaHessianOptimizerNames | str = field(
        default=TrainingArguments.optim,
        metadata={
            "help": "The optimizer to use: any of transformers' `OptimizerNames`, or `adahessian` "
            "(with `--optim_args`, e.g. \"hessian_interval=10,block_size=32,eps=1e-4\")."
        },
    )
    # transformers 5 removed it; 4.x-era example scripts still read it.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in a non-empty --output_dir instead of resuming from its last checkpoint "
                          "(read by the example scripts; transformers 5 itself no longer uses it)."},
    )

    def __post_init__(self):
        adahessian = str(getattr(self.optim, "value", self.optim)) == ADAHESSIAN
        if adahessian:
            # The stock checks only know the stock names; any plain one stands in.
            self.optim = OptimizerNames.ADAMW_TORCH
        super().__post_init__()
        if adahessian:
            self.optim = AdaHessianOptimizerNames.ADAHESSIAN
            self._check_adahessian()

    def set_optimizer(self, name: str = "adamw_torch", learning_rate: float = 5e-5, **kwargs):
        """As ``TrainingArguments.set_optimizer``, also accepting ``name="adahessian"``."""
        if str(name) != ADAHESSIAN:
            return super().set_optimizer(name=name, learning_rate=learning_rate, **kwargs)
        super().set_optimizer(name="adamw_torch", learning_rate=learning_rate, **kwargs)
        self.optim = AdaHessianOptimizerNames.ADAHESSIAN
        self._check_adahessian()
        return self

    def _fsdp_version_2(self) -> bool:
        config = self.fsdp_config if isinstance(self.fsdp_config, dict) else {}
        # transformers' own default (FSDP1 is deprecated there).
        return int(config.get("version", 2)) == 2

    @property
    def adahessian_settings(self) -> AdaHessianSettings:
        """The AdaHessian settings this run uses: ``--optim_args`` over the defaults."""
        return settings_of(self)

    def _check_adahessian(self) -> None:
        settings = parse_optim_args(self.optim_args)
        validate(settings, self)
        object.__setattr__(self, "_adahessian_settings", settings)
        estimator = settings.optimizer_kwargs["hessian_estimator"]
        exact = estimator == "exact"
        if self.fsdp and exact:
            raise SettingsError(
                "--optim adahessian with --fsdp needs --optim_args hessian_estimator=finite_difference: the exact "
                "estimator differentiates the backward a second time, and FSDP frees the gathered parameters that "
                "second backward needs. Finite differences take two ordinary backwards, which FSDP2 shards as "
                "AdamW's (README, 'Sharded training')."
            )
        if self.fsdp and not self._fsdp_version_2():
            raise SettingsError(
                "--optim adahessian with --fsdp needs FSDP2 (fsdp_config version 2, transformers' default): FSDP1 "
                "(version 1, deprecated) hands the optimizer flattened shards, on which block averaging and the "
                "probes one process would draw do not carry over. Drop \"version\": 1 from --fsdp_config."
            )
        if self.deepspeed:
            raise SettingsError(
                "--optim adahessian does not support --deepspeed: ZeRO partitions the gradients and the optimizer "
                "state behind its own engine, which neither estimator's Hessian pass can reach. Drop --deepspeed "
                "for plain data parallelism (accelerate launch / torchrun), or shard with --fsdp (FSDP2) and "
                "--optim_args hessian_estimator=finite_difference (README, 'Sharded training')."
            )
        if self.torch_compile and exact:
            raise SettingsError(
                "--optim adahessian does not support --torch_compile with hessian_estimator=exact: the double "
                "backward cannot go through a compiled graph (aot_autograd refuses it). Add "
                "--optim_args hessian_estimator=finite_difference (two ordinary backwards), which runs compiled."
            )
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            kwargs = getattr(self, name, None)
            if exact and isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
                raise SettingsError(
                    f"--optim adahessian cannot run with {name}={{'use_reentrant': true}} and the exact estimator: "
                    "reentrant checkpointing has no double backward. Drop use_reentrant (non-reentrant is the "
                    "default), or use --optim_args hessian_estimator=finite_difference."
                )
        if self.learning_rate < ADAM_LIKE_LR:
            logger.warning(
                "--learning_rate %g with --optim adahessian looks like an Adam learning rate. %s",
                self.learning_rate, RECIPE_HINT,
            )


@dataclass
class AdaHessianTrainingArguments(_AdaHessianArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` in which ``--optim adahessian`` parses."""


@dataclass
class AdaHessianSeq2SeqTrainingArguments(_AdaHessianArgumentsMixin, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` in which ``--optim adahessian`` parses."""
