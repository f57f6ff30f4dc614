"""Rademacher probes as a pure function of (seed, step, parameter, sample).

Counter-based, not stateful: every micro-batch of a step and every process draws
the same z without saving and reloading a generator, and a resumed run draws the
stream it would have drawn.  The global RNG is never touched, so switching
optimizers does not change dropout masks or data order.
"""

from __future__ import annotations

import torch

__all__ = ["Probes", "rademacher_like", "estimate_dtype"]

_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """splitmix64 over the words: a well-spread 63-bit seed from a few small integers."""
    x = 0x9E3779B97F4A7C15
    for w in words:
        x = (x ^ (w & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def rademacher_like(t: torch.Tensor, generator: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of ±1 with the shape and device of ``t``, in ``dtype`` (default ``t``'s).

    int8 probes take a quarter of the memory of fp32 ones and hold ±1 exactly.
    """
    # Eight probes per random byte: one draw per element is what made the probes
    # a visible share of a Hessian step (3× slower for a model's worth of them).
    n = t.numel()
    random_bytes = torch.empty((n + 7) // 8, dtype=torch.uint8, device=t.device).random_(0, 256, generator=generator)
    shifts = torch.arange(8, dtype=torch.uint8, device=t.device)
    bits = (random_bytes.unsqueeze(-1) >> shifts).bitwise_and_(1).view(-1)[:n]
    z = bits.view(torch.int8) if (dtype or t.dtype) == torch.int8 else bits.to(dtype or t.dtype)
    return z.mul_(2).sub_(1).view(t.shape)


class Probes:
    """The Rademacher probes of one step: z for (parameter index, sample) from (seed, step)."""

    def __init__(self, seed: int, step: int = 0):
        self.seed, self.step = int(seed), int(step)
        self._generators: dict[torch.device, torch.Generator] = {}

    def draw(self, index: int, like: torch.Tensor, sample: int = 0, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
        generator.manual_seed(_mix(self.seed, self.step, index, sample))
        if is_dtensor(like):
            # A shard of a sharded parameter (FSDP2) takes its slice of the probe one process would
            # draw for the whole tensor: every rank draws it whole and keeps its own part.
            from torch.distributed.tensor import distribute_tensor

            whole = rademacher_like(torch.empty(like.shape, device=like.to_local().device), generator, dtype)
            return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
        return rademacher_like(like, generator, dtype)


def is_dtensor(t) -> bool:
    """A DTensor (a parameter sharded by FSDP2), told apart without importing torch.distributed."""
    return type(t).__name__ == "DTensor"


def estimate_dtype(p: torch.Tensor) -> torch.dtype:
    """Estimates are kept in fp32, or fp64 for fp64 parameters: never below fp32."""
    return torch.promote_types(p.dtype, torch.float32)
