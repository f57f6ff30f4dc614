"""The checks on AdaHessian's hyperparameters, shared by the optimizer and the command line.

Each check raises :class:`HyperparameterError`, which carries the name, the value
and what is accepted, so that each caller words the message its own way: the
optimizer as ``AdaHessian: invalid lr=-0.1; ...``, the command line as
``--learning_rate: invalid value -0.1; ...``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "AdaHessianUsageError",
    "HyperparameterError",
    "check",
    "check_int",
    "check_group_hyperparameters",
    "check_optimizer_hyperparameters",
]


class AdaHessianUsageError(ValueError):
    """Input AdaHessian cannot train with (arguments, model, checkpoint), found before training.

    The message is one line that names what is wrong and what to do; the example
    scripts print it as ``error: ...`` and exit with status 2.
    """


class HyperparameterError(ValueError):
    """A hyperparameter outside what AdaHessian accepts."""

    def __init__(self, name: str, value: Any, expected: str):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"invalid {name}={value!r}; expected {expected}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(name: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        raise HyperparameterError(name, value, expected)


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    check(name, isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          value, f"an integer >= {minimum}")


def check_group_hyperparameters(lr, betas, eps, weight_decay, hessian_power, block_size) -> None:
    """What a parameter group may override; ``float('inf')`` and NaN are refused everywhere."""
    check("lr", _is_number(lr) and 0 < lr < math.inf, lr,
          "a finite positive number (recipes use 0.15 from scratch, ~1e-3 to 3e-2 for fine-tuning)")
    check("betas", isinstance(betas, (tuple, list)) and len(betas) == 2
          and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas), betas, "two numbers in [0, 1)")
    check("eps", _is_number(eps) and 0 < eps < math.inf, eps,
          "a finite positive number (the authors' recipes use 1e-4)")
    check("weight_decay", _is_number(weight_decay) and 0 <= weight_decay < math.inf, weight_decay,
          "a finite number >= 0")
    check("hessian_power", _is_number(hessian_power) and 0.0 <= hessian_power <= 1.0, hessian_power,
          "a number in [0, 1] (1 or 0.5 in the recipes)")
    check_int("block_size", block_size)


ESTIMATORS = ("exact", "finite_difference")


FD_SCHEMES = ("forward", "central")


GUARD_REFERENCES = ("last", "average")


def check_optimizer_hyperparameters(hessian_interval, n_samples, hessian_estimator, fd_scheme, fd_step,
                                    hessian_warmup=0, update_clip=None, min_row_estimates=1, stale_guard=False,
                                    stale_guard_reference="last", hessian_warmup_interval=1) -> None:
    """What belongs to the optimizer as a whole."""
    check_int("hessian_interval", hessian_interval)
    check("stale_guard_reference", stale_guard_reference in GUARD_REFERENCES, stale_guard_reference,
          " or ".join(repr(e) for e in GUARD_REFERENCES))
    check("stale_guard_reference", stale_guard_reference == "last" or bool(stale_guard), stale_guard_reference,
          "'last' (the default) without stale_guard=True: it says what the stale guard compares with, "
          "so turn the guard on too")
    check_int("hessian_warmup", hessian_warmup, minimum=0)
    check_int("hessian_warmup_interval", hessian_warmup_interval)
    check("update_clip", update_clip is None or (_is_number(update_clip) and 0 < update_clip < math.inf),
          update_clip, "a finite positive number (or None: unbounded)")
    check_int("min_row_estimates", min_row_estimates)
    check_int("n_samples", n_samples)
    check("hessian_estimator", hessian_estimator in ESTIMATORS, hessian_estimator,
          " or ".join(repr(e) for e in ESTIMATORS))
    check("fd_scheme", fd_scheme in FD_SCHEMES, fd_scheme, " or ".join(repr(e) for e in FD_SCHEMES))
    check("n_samples", n_samples == 1 or hessian_estimator == "exact", n_samples,
          "1 with hessian_estimator='finite_difference' (each probe there costs a gradient pass of its own; "
          "more probes are an option of the exact estimator, or average over blocks with block_size)")
    check("fd_step", fd_step is None or (_is_number(fd_step) and 0 < fd_step < 1), fd_step,
          "a number in (0, 1): the perturbation relative to the parameters' norm (None: by dtype)")
