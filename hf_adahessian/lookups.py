"""Embedding lookups differentiated through the rows they read, on the exact estimator's pass.

A word embedding is much of a fine-tuned model (MiniLM: 11.7M of its 22.7M
parameters), and a batch reads a few hundred of its rows.  Differentiated through
the weight, each backward of the exact estimator makes a dense vocabulary-sized
tensor (the gradient, kept in the double-backward graph, then Hz), once per chunk
of a micro-batch: fresh memory, paged in every time.  Inside
:func:`compact_lookups`, a lookup reads ``weight[rows]`` through a leaf of just
those rows instead, so both backwards make (rows × dim) tensors, which the
estimator scatters into ``.grad`` and the estimate (made once per step).  A row
no lookup reads has a gradient and a Hessian row of exactly zero either way, so
the estimate and the gradient are the ones the dense lookup gives.

A weight that is also used another way (an LM head tied to the embedding) gets
both: its direct gradient through the weight, and its lookups' through the rows.
Finding the rows (``torch.unique``) waits for a CUDA device once per lookup; it
runs on the exact estimator's pass only, never on a plain step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .probes import is_dtensor

__all__ = ["RowLeaf", "Lookups", "compact_lookups"]

_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


@dataclass
class RowLeaf:
    """One lookup's rows: ``leaf`` is ``weight[index]`` (detached), and the lookup's graph starts there."""

    param: int  # the weight's index among the estimate's parameters
    index: torch.Tensor  # the rows read, sorted and distinct
    leaf: torch.Tensor


class Lookups(TorchFunctionMode):
    """Turns ``F.embedding`` of a target weight into a lookup in a leaf of the rows it reads.

    It is entered only for the duration of an embedding module's own call (a pre-hook and
    an always-called hook), so the rest of the forward runs without a Python mode.
    """

    def __init__(self, targets: dict[int, int]):
        super().__init__()
        self.targets = targets  # id(weight) -> parameter index
        self.leaves: list[RowLeaf] = []

    def take(self) -> list[RowLeaf]:
        """The leaves of the lookups since the last call."""
        leaves, self.leaves = self.leaves, []
        return leaves

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.embedding or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        call = {**dict(zip(_EMBEDDING_ARGS, args)), **kwargs}
        weight = call["weight"]
        param = self.targets.get(id(weight))
        if param is None or call.get("max_norm") is not None or call.get("sparse") or is_dtensor(weight):
            return func(*args, **kwargs)
        index, inverse = torch.unique(call["input"], sorted=True, return_inverse=True)
        leaf = weight.detach().index_select(0, index).requires_grad_()
        self.leaves.append(RowLeaf(param, index, leaf))
        return F.embedding(inverse, leaf, padding_idx=_row_of(call.get("padding_idx"), index, weight.shape[0]),
                           scale_grad_by_freq=call.get("scale_grad_by_freq", False))


def _row_of(padding_idx: int | None, index: torch.Tensor, rows: int) -> int | None:
    """Where the padding row sits among the rows read (its gradient stays zero), if it was read."""
    if padding_idx is None:
        return None
    padding_idx = padding_idx + rows if padding_idx < 0 else padding_idx
    hit = (index == padding_idx).nonzero()
    return int(hit[0, 0]) if hit.numel() else None


@contextlib.contextmanager
def compact_lookups(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> Iterator[Lookups]:
    """Inside, the lookups of ``model``'s embedding modules whose weight is among ``params`` read row leaves.

    Yields the :class:`Lookups` whose ``take()`` gives the leaves of the forwards so far,
    for ``HessianEstimate.accumulate(loss, rows=...)``.  Forwards without grad mode stay dense.
    """
    targets = {id(p): i for i, p in enumerate(params)}
    mode = Lookups(targets)

    def enter(*_):
        mode.__enter__()  # a pre-hook's return value would replace the module's input

    def leave(*_):
        mode.__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) in targets:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield mode
    finally:
        for handle in handles:
            handle.remove()
