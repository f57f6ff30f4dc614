"""Gradient clipping by the total norm, keeping each gradient's norm for the optimizer's step.

AdaHessian's step reads every gradient's norm (is the step finite; the stale guard's growth of
the gradient), which clipping has just measured: torch's ``clip_grad_norm_`` keeps only the total.
:func:`clip_grad_norm_measured_` is its arithmetic with the parts kept, so the step is one pass
over the gradients fewer (MiniLM: about 9 ms of a 0.5 s CPU step).
"""

from __future__ import annotations

import torch

__all__ = ["clip_grad_norm_measured_"]


def clip_grad_norm_measured_(params: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, tuple[list, list]]:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (2-norm), also returning each gradient's norm before
    clipping: ``(total, (parameters with a gradient, their norms))``, the second for
    ``AdaHessian.gradient_clipped_by_norm``.

    Where the gradients share a device and a dtype, the total and the clipped gradients are torch's bit for bit
    (its foreach norms, stacked in the same order); otherwise they differ from torch's in the order of the sum.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0), ([], [])
    norms = torch._foreach_norm([p.grad for p in params])
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total, (params, list(norms))
