"""A step without a fresh estimate through torch's fused AdamW kernel (CPU, fp32).

Between Hessian steps AdaHessian's update is AdamW's with its second moment held:

    m ← β1·m + (1 − β1)·g,   θ ← θ·(1 − lr·wd) − lr/(1 − β1^t) · m / (c·√v + eps)

(c·√v = scale·√v̂, ``optimizer._tensor_factor``).  The for-loop makes that five passes over
each tensor (lerp, decay, sqrt, add, addcdiv) where torch's fused AdamW kernel makes one,
about half the update's time on CPU.  The kernel can be told to hold v: with β2 = 1 − 2⁻⁵³,
the largest double below 1, its fp32 β2 is exactly 1 and the term it adds, 2⁻⁵³·g², is less
than half an fp32 ulp of v wherever v ≥ 2⁻²⁸·g², so v comes back bit for bit there.  Its
bias correction √(1 − β2^t) is then about 2⁻²⁶·√t, and lr, eps and the weight decay are
rescaled so that the kernel's step is the loop's to fp32 rounding.

A tensor whose denominator varies by row (an embedding whose rows are counted apart: each row's
own bias correction, the floor for rows never estimated, the stale guard's factor per row) takes the
kernel a slice of whole rows at a time, each slice's (scale·√v̂)² made into a scratch that the kernel
reads for v, with c = 1: a few row-sized vectors and one pass where the loop makes seven (the floor
and the scale included).

Where v < 2⁻²⁸·g² (a coordinate whose curvature is zero or nearly so) v creeps up by
2⁻⁵³·g² a step: after t steps c·√v gains at most c·2⁻²⁶·|g|·√t, four orders of magnitude
under eps for any gradient entry below 1.  A first call checks the kernel does all this (its
arithmetic is torch's, not a public contract); where it does not, the for-loop takes the step.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = ["HOLDING_BETA2", "fused_kernel_holds_v", "fusable", "fused_plain_update_", "fused_row_update_"]

HOLDING_BETA2 = 1.0 - 2.0**-53


def _kernel_bias_correction(step: float) -> float:
    """√(1 − β2^t) for β2 = HOLDING_BETA2, as the kernel makes it (in double)."""
    return math.sqrt(1.0 - HOLDING_BETA2**step)


def _fused_call(params, grads, exp_avgs, exp_hs, step: int, *, lr, beta1, eps, weight_decay, factor) -> None:
    """The kernel on tensors that share the step t and the factor c: its step is the loop's."""
    k = factor * _kernel_bias_correction(float(step))
    steps = [torch.tensor(float(step))] * len(params)
    # denominator √v/k' + eps/k = (√v + eps/c)/k' with k' = √(1 − β2^t): the step size lr/k·k' = lr/c
    # and the decay (lr/k)·(wd·k) = lr·wd are the loop's.
    torch._fused_adamw_(params, grads, exp_avgs, exp_hs, [], steps, lr=lr / k, beta1=beta1, beta2=HOLDING_BETA2,
                        weight_decay=weight_decay * k, eps=eps / k, amsgrad=False, maximize=False)


@functools.lru_cache(maxsize=None)
def fused_kernel_holds_v() -> bool:
    """Whether this torch's CPU fused AdamW kernel holds v and takes the loop's step (checked once a process).

    On 37 entries (a vectorised body and a scalar tail), against the update in float64.
    """
    try:
        gen = torch.Generator().manual_seed(0)
        n = 37
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-2
        m = torch.randn(n, generator=gen) * 1e-2
        v = torch.rand(n, generator=gen) * 1e-3 + 1e-6
        p0, m0, v0 = p.clone(), m.clone(), v.clone()
        lr, beta1, eps, wd, c, t = 0.01, 0.9, 1e-4, 0.1, 7.0, 3
        _fused_call([p], [g], [m], [v], t, lr=lr, beta1=beta1, eps=eps, weight_decay=wd, factor=c)
        m64 = beta1 * m0.double() + (1 - beta1) * g.double()
        p64 = p0.double() * (1 - lr * wd) - lr / (1 - beta1**t) / c * m64 / (v0.double().sqrt() + eps / c)
        holds = (torch.equal(v, v0) and torch.allclose(m.double(), m64, rtol=1e-6, atol=0)
                 and torch.allclose(p.double(), p64, rtol=1e-6, atol=1e-9))
    except (AttributeError, RuntimeError, TypeError) as err:  # no CPU fused kernel in this torch
        logger.info("AdaHessian: torch's fused AdamW kernel is not usable here (%s); the for-loop takes the steps",
                    err)
        return False
    if not holds:
        logger.info("AdaHessian: torch's fused AdamW kernel does not hold v in this torch; "
                    "the for-loop takes the steps")
    return holds


def fusable(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
    """A tensor the kernel can take: dense contiguous fp32 on CPU, its moments laid out as it is."""
    return (type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu" and p.dtype == torch.float32
            and p.is_contiguous() and m.is_contiguous() and v.is_contiguous())


def fused_plain_update_(params, grads, exp_avgs, exp_hs, steps, factors, *, lr, beta1, eps, weight_decay) -> None:
    """The update of tensors without an estimate this step, each with its step t and factor c
    (c·√v = scale·√v̂), in one kernel call for each (t, c) they share."""
    groups: dict[tuple[int, float], list[int]] = {}
    for i, key in enumerate(zip(steps, factors)):
        groups.setdefault(key, []).append(i)
    for (step, factor), members in groups.items():
        pick = lambda xs: [xs[i] for i in members]  # noqa: E731
        _fused_call(pick(params), pick(grads), pick(exp_avgs), pick(exp_hs), step, lr=lr, beta1=beta1, eps=eps,
                    weight_decay=weight_decay, factor=factor)


def fused_row_update_(param, grad, exp_avg, step: int, parts, *, lr, beta1, eps, weight_decay) -> None:
    """The update of a tensor whose denominator varies by row (its rows' own bias corrections, floor and
    stale-guard scales), a slice of whole rows at a time: ``parts`` yields (rows, w), w the slice's
    (scale·√v̂)², which the kernel reads for v with c = 1 and may change (a scratch, not the state)."""
    for rows, w in parts:
        _fused_call([param[rows]], [grad[rows]], [exp_avg[rows]], [w], step, lr=lr, beta1=beta1, eps=eps,
                    weight_decay=weight_decay, factor=1.0)
