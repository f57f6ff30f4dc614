"""Training arguments in which ``--optim adahessian`` parses, and the ``--optim_args`` parser.

``TrainingArguments.optim`` is typed with transformers' closed ``OptimizerNames``
enum, so the subclasses widen that one field to an enum with every stock name
plus ``adahessian``; everything else (``--learning_rate``, ``--adam_beta1/2``,
``--weight_decay``, schedulers, checkpointing) stays the Trainer's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import ExplicitEnum

from .optimizer import _check, _check_int, _validate_group_hyperparameters

logger = logging.getLogger(__name__)

ADAHESSIAN = "adahessian"

AdaHessianOptimizerNames = ExplicitEnum(
    "AdaHessianOptimizerNames",
    {**{m.name: m.value for m in OptimizerNames}, "ADAHESSIAN": ADAHESSIAN},
)
AdaHessianOptimizerNames.__doc__ = "transformers' `OptimizerNames` plus `adahessian`."

# key -> (type, default); the defaults are the authors' recipes.  Everything the
# Trainer already has a flag for (lr, betas, weight decay) is taken from there.
OPTIM_ARGS: dict[str, tuple[type, Any]] = {
    "eps": (float, 1e-4),
    "hessian_power": (float, 1.0),
    "hessian_interval": (int, 1),
    "n_samples": (int, 1),
    "block_size": (int, 1),
    "average_conv_kernel": (bool, True),
    "foreach": (bool, None),
    # The trainer's: estimate the Hessian on this share of each batch (1 = all of it).
    "hessian_batch_fraction": (float, 1.0),
}

# A learning rate below this is almost surely an Adam one: AdaHessian's step is
# m̂/√v̂ with v the Hessian's scale, so it wants learning rates ~100x larger.
ADAM_LIKE_LR = 1e-3
RECIPE_HINT = (
    "AdaHessian's update is normalised by the Hessian, so its learning rates are far larger "
    "than Adam's: the authors used 0.15 when training from scratch (with eps=1e-4, "
    "hessian_power=1, block_size=32 for transformers); for fine-tuning a pretrained BERT "
    "see the README's recipes."
)


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"--optim_args: {key}={value!r} is not a boolean; use true or false.")


def parse_adahessian_optim_args(optim_args: str | None) -> dict[str, Any]:
    """``"hessian_power=0.5,hessian_interval=10"`` -> typed, validated keyword arguments.

    Every key in ``OPTIM_ARGS`` is returned (defaults filled in), so what a run
    used is visible in one place.  Errors name the key, the value and what is
    accepted, so a bad command line fails at start-up rather than at step one.
    """
    parsed = {key: default for key, (_, default) in OPTIM_ARGS.items()}
    accepted = ", ".join(OPTIM_ARGS)
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--optim_args: {item!r} is not key=value; accepted keys for adahessian: {accepted}.")
        if key not in OPTIM_ARGS:
            raise ValueError(f"--optim_args: unknown key {key!r} for adahessian; accepted keys: {accepted}.")
        kind = OPTIM_ARGS[key][0]
        if kind is bool:
            parsed[key] = _parse_bool(key, value)
            continue
        try:
            parsed[key] = kind(value)
        except ValueError:
            raise ValueError(f"--optim_args: {key}={value!r} is not {'an integer' if kind is int else 'a number'}.") from None
    try:
        _validate_group_hyperparameters(1.0, (0.0, 0.0), parsed["eps"], 0.0, parsed["hessian_power"], parsed["block_size"])
        _check_int("hessian_interval", parsed["hessian_interval"])
        _check_int("n_samples", parsed["n_samples"])
        fraction = parsed["hessian_batch_fraction"]
        _check("hessian_batch_fraction", 0.0 < fraction <= 1.0, fraction, "a number in (0, 1]")
    except ValueError as err:
        raise ValueError(f"--optim_args: {str(err).removeprefix('AdaHessian: ')}") from None
    return parsed


def is_adahessian(args: TrainingArguments) -> bool:
    return str(getattr(args.optim, "value", args.optim)) == ADAHESSIAN


@dataclass
class _AdaHessianArgumentsMixin:
    """Widens ``optim`` to accept ``adahessian`` and checks what AdaHessian cannot run with yet."""

    optim: AdaHessianOptimizerNames | str = field(
        default=TrainingArguments.optim,
        metadata={
            "help": "The optimizer to use: any of transformers' `OptimizerNames`, or `adahessian` "
            "(with `--optim_args`, e.g. \"hessian_power=1,hessian_interval=1,block_size=32,eps=1e-4\")."
        },
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

    @property
    def adahessian_kwargs(self) -> dict[str, Any]:
        """The AdaHessian settings this run uses: ``--optim_args`` over the recipe defaults."""
        return parse_adahessian_optim_args(self.optim_args)

    def _check_adahessian(self) -> None:
        self.adahessian_kwargs  # fail at start-up on a bad --optim_args
        unsupported = []
        if self.fsdp:
            unsupported.append("--fsdp")
        if self.deepspeed:
            unsupported.append("--deepspeed")
        if self.torch_compile:
            unsupported.append("--torch_compile")
        if unsupported:
            raise ValueError(
                f"--optim adahessian does not support {' and '.join(unsupported)} yet: the double backward "
                "needs full, uncompiled parameters on each process. Use plain data parallelism "
                "(accelerate launch / torchrun without FSDP or DeepSpeed) and drop --torch_compile."
            )
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            kwargs = getattr(self, name, None)
            if isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
                raise ValueError(
                    f"--optim adahessian cannot run with {name}={{'use_reentrant': true}}: reentrant "
                    "checkpointing has no double backward. Drop use_reentrant (non-reentrant is the default)."
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
