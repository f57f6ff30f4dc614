"""The all-reduce that DDP does not do for a double backward.

DDP averages gradients from hooks that fire when ``.grad`` is accumulated by
``backward()``.  A Hessian step takes its gradients with ``torch.autograd.grad``
outside those hooks, so the gradients and the Hessian estimates are averaged
here instead, once per optimizer step, in a few flat buckets.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place across all processes, one collective per (device, dtype)."""
    n = world_size()
    if n == 1 or not tensors:
        return
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        buckets[(t.device, t.dtype)].append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
