"""Dropout masks drawn once for the passes of a finite-difference step.

The passes of a finite-difference step (at θ + εz, then at θ) draw the same dropout masks:
the perturbed pass runs in a fork of the RNG, so the pass after it draws again what it drew.
On CPU torch's dropout draws its mask with an in-place ``bernoulli_``, at about 8 ns an entry
on this project's machine: 80 ms of MiniLM's 0.3 s forward at batch 16.  :class:`Masks` keeps
what the first pass drew (a byte an entry) with the CPU RNG state after each draw; a pass
replaying them takes each mask back and sets that state instead of drawing.  So the masks are
the ones drawing would give, and the RNG is where drawing would have left it at every point:
whatever else draws in between (a model's own ``torch.rand``, checkpointing's saved states)
draws as it would have.  Where the replaying pass asks for something else (another shape,
another probability, more draws than were kept), it draws from then on, from the state drawing
would have reached.

Only ``bernoulli_`` with a number for its probability, on a CPU tensor and the default
generator, is kept; CUDA's fused dropout and everything else draws as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Masks", "replay_possible"]

_BERNOULLI = torch.ops.aten.bernoulli_.float


def _kept_draw(func, args, kwargs) -> bool:
    return func is _BERNOULLI and kwargs.get("generator") is None and args[0].device.type == "cpu"


def _probability(args, kwargs) -> float:
    return float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))


def replay_possible(model: torch.nn.Module) -> bool:
    """Whether a pass of ``model`` can run under the replay: not a compiled one, which Dynamo traces
    with its own random ops and which a Python dispatch mode would push back to eager."""
    return not any(hasattr(module, "_orig_mod") for module in model.modules())


class Masks:
    """The dropout masks one pass drew, for the passes after it that start from the same RNG state."""

    def __init__(self):
        self._draws: list[tuple[float, torch.Tensor, torch.Tensor] | None] = []
        self.replayed_draws = 0

    @contextlib.contextmanager
    def kept(self):
        """Draw as usual and keep each mask with the CPU RNG state after it."""
        with _Keeping(self._draws):
            yield

    @contextlib.contextmanager
    def replayed(self, last: bool = True):
        """Take the kept masks back in order instead of drawing; ``last`` lets each go once used."""
        mode = _Replaying(self._draws, last)
        with mode:
            yield
        self.replayed_draws += mode.replayed


class _Keeping(TorchDispatchMode):
    def __init__(self, draws: list):
        super().__init__()
        self.draws = draws

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _kept_draw(func, args, kwargs):
            self.draws.append((_probability(args, kwargs), out.to(torch.bool), torch.get_rng_state()))
        return out


class _Replaying(TorchDispatchMode):
    def __init__(self, draws: list, last: bool):
        super().__init__()
        self.draws, self.last = draws, last
        self.next = 0
        self.replayed = 0
        self.drawing = False  # from the first request that differs from what was kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.drawing or not _kept_draw(func, args, kwargs):
            return func(*args, **kwargs)
        target = args[0]
        kept = self.draws[self.next] if self.next < len(self.draws) else None
        if kept is None or kept[0] != _probability(args, kwargs) or kept[1].shape != target.shape:
            # The RNG is where drawing would have left it after the draws replayed so far.
            self.drawing = True
            return func(*args, **kwargs)
        _, mask, state = kept
        if self.last:
            self.draws[self.next] = None
        self.next += 1
        self.replayed += 1
        target.copy_(mask)
        torch.set_rng_state(state)
        return target
