"""One optimizer step's estimate of the Hessian diagonal.

For a Rademacher vector z (entries ±1), E[z ⊙ Hz] = diag(H): the off-diagonal
terms cancel in expectation because E[z_i z_j] = 0 for i ≠ j and z_i² = 1.

A :class:`HessianEstimate` belongs to one optimizer step.  It is made once
(``AdaHessian.estimate()``), fed one micro-batch at a time by an estimator
(``estimators.py``: the exact double backward or finite differences), reduced
across processes by an explicit :meth:`~HessianEstimate.all_reduce_`, and
consumed by ``AdaHessian.step()``, which takes |·|, averages it over blocks and
lets only the coordinates the estimate observed into v.

Its probes are a pure function of (seed, step, parameter, sample), so every
micro-batch and every process draws the same z without saving a generator
state, and a resumed run draws the stream it would have drawn.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .distributed import all_reduce_mean_
from .estimators import accumulate_exact
from .lookups import RowLeaf
from .probes import Probes, estimate_dtype, is_dtensor

__all__ = ["HessianEstimate", "block_average", "block_average_", "hessian_diagonal_", "observed_rows"]


def block_average(d: torch.Tensor, block_size: int = 1, average_conv_kernel: bool = True) -> torch.Tensor:
    """Average a Hessian-diagonal estimate over the blocks that share a curvature.

    Conv kernels (4-D) are averaged over their spatial dims; then any tensor of
    two or more dims is averaged over contiguous blocks of ``block_size`` along
    its last dim, the last block being shorter when the size does not divide.
    Smoothing over blocks lowers the variance of a one-probe estimate, which is
    why the authors' transformer recipe used blocks of 32.
    """
    return block_average_(d.clone(), block_size, average_conv_kernel)


def block_average_(d: torch.Tensor, block_size: int = 1, average_conv_kernel: bool = True) -> torch.Tensor:
    """``block_average`` in place (no parameter-sized buffer), returning ``d``."""
    if d.dim() == 4 and average_conv_kernel:
        d.copy_(d.mean(dim=(2, 3), keepdim=True).expand_as(d))
    if d.dim() < 2 or block_size <= 1 or d.shape[-1] <= 1:
        return d
    n = d.shape[-1]
    full = (n // block_size) * block_size
    # Splitting the last dim is a view even on the slice, so each block is averaged where it lies.
    blocks = [d[..., :full].unflatten(-1, (full // block_size, block_size))] if full else []
    if full < n:
        blocks.append(d[..., full:])
    for block in blocks:
        block.copy_(block.mean(dim=-1, keepdim=True).expand_as(block))
    return d


def hessian_diagonal_(signed_sum: torch.Tensor, block_size: int = 1, average_conv_kernel: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D = |sum| averaged over blocks, the rows it observed and the sum of D: what ``step()`` takes.

    The absolute value is taken in place.  Where blocks of ``block_size`` tile the last
    dim evenly, D comes back as a broadcast view of the block means, shaped
    ``(*leading, blocks, block_size)`` with stride 0 along the last dim: v is updated
    through it (``v.view(D.shape)``) and no parameter-sized D is ever written.  The row
    coverage and the sum come from the same one reduction over |sum|, by block or by row.
    """
    d = signed_sum.abs_()
    width = d.shape[-1] if d.dim() >= 2 else 1
    tiled = (d.dim() >= 2 and 1 < block_size < width and width % block_size == 0
             and not (d.dim() == 4 and average_conv_kernel) and not is_dtensor(d))
    if not tiled:
        # Rows first: averaging divides, and a lone subnormal entry must still count as observed.
        row_sums = _row_sums(d)
        return block_average_(d, block_size, average_conv_kernel), row_sums.gt(0), row_sums.sum()
    blocks = d.unflatten(-1, (width // block_size, block_size))
    block_sums = blocks.sum(dim=-1, keepdim=True)
    row_sums = _row_sums(block_sums)
    means = block_sums.div_(block_size)
    return means.expand(blocks.shape), row_sums.gt(0), row_sums.sum()


def _row_sums(magnitude: torch.Tensor) -> torch.Tensor:
    """Per row (slice along the first dim) the sum of a non-negative tensor; a 0-d tensor is its own row."""
    return magnitude if magnitude.dim() == 0 else magnitude.reshape(magnitude.shape[0], -1).sum(dim=1)


def observed_rows(magnitude: torch.Tensor) -> torch.Tensor:
    """Which rows (slices along the first dim) the estimate saw, from |D| before block averaging.

    An embedding row that no token of the batch used has a gradient and a Hessian
    row of exactly zero, so its |D| is exactly zero: that is "not observed", not
    "no curvature".  A sum of non-negative numbers is zero only when each is, so
    a row sum tells (one reduction, where testing every entry for zero costs a
    boolean tensor of the parameter's size).  Rows are the granularity because
    that is how coverage varies in practice (embedding rows, dead units); a 0-d
    tensor is one row.  A row holding NaN is "not observed", and the estimate it
    belongs to is not finite, so the optimizer skips it whole.
    """
    return _row_sums(magnitude).gt(0)


class HessianEstimate:
    """The signed sums of z ⊙ Hz over one step's micro-batches (and, after the reduce, processes).

    ``params`` are the optimizer's trainable parameters in group order; the probe of
    parameter ``i`` is ``probes.draw(i, ...)``.  The sums are kept signed and
    unscaled (an AMP loss scale is divided out as each term is added): across
    micro-batches and processes they are added before the absolute value is taken,
    as for one large batch.  With one probe per step (``n_samples=1``, and always
    with finite differences) they keep Hz itself (``probe_applied`` False): its
    absolute value is the same; :meth:`terms` gives z ⊙ Hz either way.
    """

    def __init__(self, params: Sequence[torch.Tensor], seed: int, step: int, n_samples: int = 1, key=None,
                 hessian_scale: float | None = None):
        self.params = list(params)
        self.probes = Probes(seed, step)
        self.step, self.n_samples, self.key = step, n_samples, key
        # The largest AMP loss scale a micro-batch came with, and the scale the exact
        # estimator's second backward runs at under one (the optimizer's, which backs off
        # on overflow).
        self.loss_scale = 1.0
        self.hessian_scale = hessian_scale
        self.sums: list[torch.Tensor | None] = [None] * len(self.params)
        # Whether an estimator put gradients into .grad outside DDP's reducer: then the
        # all-reduce must average those too.
        self.made_gradients = False
        # Finite differences: (ε, loss scale, scheme) while the sums hold Σ g(θ + εz) (and,
        # central, − Σ g(θ − εz)); finish_() turns them into the difference quotient.
        self.difference: tuple[float, float, str] | None = None
        self.micro_batches = 0
        self.reduced = False
        # Made on a step without a scheduled Hessian, for parameters no estimate has seen yet
        # (``AdaHessian.needs_catch_up``): step() lets it into v all the same.
        self.catch_up = False

    def accumulate(self, loss: torch.Tensor | None = None, *, grads: Sequence[torch.Tensor | None] | None = None,
                   rows: Sequence[RowLeaf] = (), row_grads: Sequence[torch.Tensor | None] | None = None,
                   scale: float = 1.0, add_grad: bool = True) -> None:
        """Add one micro-batch with the exact estimator (double backward); see ``estimators.accumulate_exact``.

        ``loss`` as it would go to ``backward()``: divided for accumulation, times the
        AMP loss ``scale`` if there is one.  Adds the micro-batch's gradient to ``.grad``
        unless ``add_grad=False``, and frees the graph before returning.  ``rows``: the
        forward's embedding lookups read through row leaves (``lookups.compact_lookups``).
        """
        self.loss_scale = max(self.loss_scale, scale)
        accumulate_exact(self, loss, grads=grads, rows=rows, row_grads=row_grads, scale=scale, add_grad=add_grad,
                         hessian_scale=self.hessian_scale if scale > 1.0 else None)

    def probe(self, index: int, sample: int = 0, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        return self.probes.draw(index, self.params[index], sample, dtype)

    def add_(self, index: int, term: torch.Tensor) -> None:
        """Add a term (fresh, owned by the estimate from now on) to parameter ``index``'s sum."""
        acc = self.sums[index]
        self.sums[index] = term if acc is None else acc.add_(term)

    def add_rows_(self, index: int, rows: torch.Tensor, term: torch.Tensor) -> None:
        """Add a term for the given rows (a row leaf's) to parameter ``index``'s sum; other rows get nothing."""
        acc = self.sums[index]
        if acc is None:
            acc = self.sums[index] = torch.zeros_like(self.params[index], dtype=term.dtype)
        acc.index_add_(0, rows, term)

    @property
    def probe_applied(self) -> bool:
        """Whether the sums are z ⊙ Hz or Hz: with one probe |z ⊙ Hz| = |Hz| to the bit, and |·| is all
        that step() takes, so the product by z is made only where several probes are summed."""
        return self.n_samples > 1

    def terms(self) -> list[torch.Tensor]:
        """z ⊙ Hz per parameter (the sums as they stand, the probe applied where it is not yet): new tensors."""
        return [s.clone() if self.probe_applied else s * self.probe(i, 0, s.dtype)
                for i, s in enumerate(self.filled())]

    def filled(self) -> list[torch.Tensor]:
        """Every sum, a zero tensor where nothing was added: a fixed set on every process."""
        for i, p in enumerate(self.params):
            if self.sums[i] is None:
                self.sums[i] = torch.zeros_like(p, dtype=estimate_dtype(p))
        return self.sums  # type: ignore[return-value]

    def all_reduce_(self, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        """Average the estimate (and the gradients it made) across processes, in place.

        Every process sends the same list of tensors, whichever parameters its own
        micro-batches touched: a parameter used on one rank only gets a zero sum
        and, if the estimate made gradients, a zero gradient on the others, and a
        gradient that is None on every process is None again afterwards.
        """
        if any(is_dtensor(p) for p in self.params):
            # Sharded (FSDP2): the gradients these sums were made from were reduce-scattered by FSDP,
            # so each shard's sum already is the average over processes.
            self.reduced = True
            return
        tensors = list(self.filled())
        grads = []
        if self.made_gradients:
            present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32,
                                   device=self.params[0].device if self.params else None)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.params]
            tensors += grads + [present]
        (reduce or all_reduce_mean_)(tensors)
        if self.made_gradients:
            for p, used in zip(self.params, present.tolist()):
                if used == 0:
                    p.grad = None
        self.reduced = True

    def finish_(self) -> None:
        """For finite differences: complete the difference, before anything changes ``.grad``.

        Forward differences need the gradient at θ, so this is called after the last
        micro-batch (and after the reduce), before clipping or unscaling touch ``.grad``.
        """
        if self.difference is None:
            return
        eps, scale, scheme = self.difference
        for i, p in enumerate(self.params):
            acc = self.sums[i]
            g = p.grad if scheme == "forward" else None
            if acc is None and g is None:
                continue
            if acc is None:
                acc = self.sums[i] = torch.zeros_like(p, dtype=estimate_dtype(p))
            if g is not None:
                acc.sub_(g.to(acc.dtype), alpha=1.0 / scale)
            # Hz itself (one probe: see probe_applied), so neither the probe nor the product is made again.
            acc.div_(eps if scheme == "forward" else 2 * eps)
        self.difference = None

    def _set_difference(self, eps: float, scale: float, scheme: str) -> None:
        if self.difference is not None and self.difference != (eps, scale, scheme):
            raise RuntimeError("finite-difference micro-batches of one step must share ε, the loss scale and the scheme")
        self.difference = (eps, scale, scheme)
