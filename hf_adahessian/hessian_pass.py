"""What a Hessian step needs from the model and from accelerate, in one place.

Used by ``AdaHessianTrainer`` and by every benchmark and profile, so that what is
measured is what the trainer runs:

* :func:`double_backward_ready` — the exact estimator's forward: outside DDP's
  reducer (it cannot see ``autograd.grad``), with an attention implementation that
  has a double backward (SDPA's math kernel; flex attention swapped for SDPA);
  :func:`exact_pass` adds embedding lookups through row leaves and the capture;
* :func:`capture_backward` / :func:`mark` — the seam onto accelerate: a marked
  loss reaches ``Accelerator.backward`` as any loss does, accelerate divides it for
  accumulation and multiplies it by the loss scale as it always does, and when it
  calls ``.backward()`` on the result the Hessian pass takes over.  Nothing of
  accelerate is patched or re-implemented; :func:`amp_scale` reads its scaler;
* :func:`perturbed_pass` — the finite-difference estimator's pass at θ ± εz;
  :func:`same_dropout_masks` — the dropout masks of a batch's passes drawn by the first and
  replayed by the others (``dropout_masks.py``);
* :func:`fsdp_gradient_sync` / :func:`fsdp_resharded` — what FSDP2 needs of a Hessian step:
  each micro-batch's gradients reduced into the shards, θ ± εz gathered afresh;
* :func:`micro_batch` — one micro-batch of a Hessian step through the Trainer's own
  ``training_step``, for each estimator (exact, exact in chunks, exact on a sub-batch,
  finite differences).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from .distributed import world_size
from .dropout_masks import Masks, replay_possible
from .estimate import HessianEstimate
from .estimators import add_perturbed_gradients, fd_epsilon, perturbed, perturbed_gradients, rng_devices
from .lookups import compact_lookups

__all__ = [
    "double_backward_ready",
    "double_backward_active",
    "exact_pass",
    "no_sync",
    "fsdp_gradient_sync",
    "fsdp_resharded",
    "capture_backward",
    "mark",
    "is_marked",
    "amp_scale",
    "split_batch",
    "micro_batch",
    "perturbed_pass",
    "same_dropout_masks",
    "running_stats_kept",
    "untraced",
    "catch_up",
]

# Attention implementations whose backward is built from ordinary ops, or SDPA,
# whose math kernel (forced below) has a double backward.  Others are swapped to
# "sdpa" for the Hessian forward.
DOUBLE_BACKWARD_ATTENTION = {None, "eager", "sdpa"}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(model, "module", None), torch.nn.Module) and isinstance(model, DistributedDataParallel):
        model = model.module
    return model


@contextlib.contextmanager
def no_sync(model: torch.nn.Module):
    """DDP's ``no_sync`` when ``model`` is DDP-wrapped, else nothing."""
    with model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def fsdp_gradient_sync(model: torch.nn.Module, restore: bool):
    """FSDP2's gradient reduction on for the duration, then ``restore`` (what accelerate had set).

    A Hessian micro-batch reads the gradient of each of its backwards (θ ± εz, then θ) from
    the sharded ``.grad``, which FSDP2 fills only when it reduces: under accelerate's
    ``no_sync`` it would keep adding them, unsharded, to the step's gradient instead.  So
    on Hessian steps every micro-batch is reduced (one reduce-scatter more per micro-batch
    before the last); other steps accumulate without communication as usual.
    """
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:  # not an FSDP2 module
        yield
        return
    setter(True)
    try:
        yield
    finally:
        setter(restore)


def _reshard(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
            module.reshard()


@contextlib.contextmanager
def fsdp_resharded(model: torch.nn.Module):
    """FSDP2's gathered parameters dropped on entry and on exit, so that θ ± εz (and θ) are gathered afresh.

    FSDP2 keeps the root's gathered parameters after a forward until a backward reshards
    them; after a no-grad forward (an evaluation, the loss-normalisation check) the next
    forward would compute with those, not with the perturbed shards.
    """
    _reshard(model)
    try:
        yield
    finally:
        _reshard(model)


@contextlib.contextmanager
def running_stats_kept(model: torch.nn.Module):
    """The running statistics of every BatchNorm (and tracking InstanceNorm) put back on exit.

    A forward in train mode moves them; the passes a Hessian step adds to the Trainer's own
    (θ ± εz, the Hessian pass on a sub-batch, a catch-up, the loss-normalisation check) must
    not, or a model's statistics would be a different average than AdamW's on the same batches.
    """
    kept = [(m, {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")
                 if isinstance(getattr(m, k, None), torch.Tensor)})
            for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in kept:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


@contextlib.contextmanager
def untraced(model: torch.nn.Module, params):
    """A pass added to the Trainer's own that leaves no trace: the RNG forked (the pass after it
    draws the same dropout masks) and the running statistics put back."""
    with torch.random.fork_rng(devices=rng_devices(params)), running_stats_kept(model):
        yield


_DOUBLE_BACKWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("_DOUBLE_BACKWARD", default=False)


def double_backward_active() -> bool:
    """Whether the code running now is inside :func:`double_backward_ready` (the exact estimator's forward).

    A trainer whose loss runs through a kernel without a double backward (TRL's fused
    LM head) computes it the plain way there instead.
    """
    return _DOUBLE_BACKWARD.get()


@contextlib.contextmanager
def double_backward_ready(model: torch.nn.Module):
    """No DDP reducer, and attention with a double backward, for the exact estimator's forward."""
    with contextlib.ExitStack() as stack:
        token = _DOUBLE_BACKWARD.set(True)
        stack.callback(_DOUBLE_BACKWARD.reset, token)
        stack.enter_context(no_sync(model))
        inner = _unwrapped(model)
        config = getattr(inner, "config", None)
        attn = getattr(config, "_attn_implementation", None)
        if attn not in DOUBLE_BACKWARD_ATTENTION and hasattr(inner, "set_attn_implementation"):
            inner.set_attn_implementation("sdpa")
            stack.callback(inner.set_attn_implementation, attn)
        # SDPA's flash and memory-efficient kernels (on CPU too) have no double backward.
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


# ----------------------------------------------------------------------------- the backward seam

_SINK: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar("_SINK", default=None)


class _MarkedLoss(torch.Tensor):
    """A loss whose ``backward()`` goes to the active sink instead of autograd.

    Every op on it (accelerate's division for accumulation, the GradScaler's
    multiplication) keeps the subclass, so what reaches ``backward()`` is exactly
    what accelerate would have backpropagated.
    """

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        sink = _SINK.get()
        if sink is None:
            raise RuntimeError("a loss marked for the Hessian pass was backpropagated outside capture_backward().")
        sink(self.as_subclass(torch.Tensor))


@contextlib.contextmanager
def capture_backward(sink: Callable[[torch.Tensor], None]):
    """Inside, ``backward()`` of a loss made by :func:`mark` calls ``sink(loss)`` instead."""
    if _SINK.get() is not None:
        raise RuntimeError("capture_backward() does not nest.")
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def mark(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` marked for the active capture, or ``loss`` itself when there is none."""
    if _SINK.get() is None or not isinstance(loss, torch.Tensor):
        return loss
    return loss.as_subclass(_MarkedLoss)


def is_marked(t) -> bool:
    """Whether ``t`` is a loss on its way to the Hessian pass."""
    return isinstance(t, _MarkedLoss)


def plain(t):
    """A marked tensor (the Trainer's returned loss) as a plain one."""
    return t.as_subclass(torch.Tensor) if isinstance(t, _MarkedLoss) else t


def amp_scale(accelerator) -> float:
    """The loss scale accelerate multiplies the loss by (1 without a GradScaler)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


# ----------------------------------------------------------------------------- batches


def split_batch(inputs: dict, sizes: list[int], count_items: Callable[[dict], float]) -> list[tuple[dict, float]]:
    """The batch cut into consecutive row ranges of ``sizes``, each with its share of the items.

    Items are what the Trainer counts for ``num_items_in_batch`` (``count_items``):
    label tokens that are not ignored, or rows when there are no labels.
    """
    batch = _batch_size(inputs)
    total = count_items(inputs)
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        part = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
        share = count_items(part) / total if total else size / batch
        out.append((part, share))
        start += size
    return out


def _batch_size(inputs: dict) -> int:
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            "hessian_batch_fraction and hessian_chunks need inputs whose tensors share one batch dimension; "
            f"got leading sizes {sorted(sizes)}. Use hessian_batch_fraction=1,hessian_chunks=1."
        )
    return sizes.pop()


def chunk_sizes(batch: int, chunks: int) -> list[int]:
    chunks = max(1, min(chunks, batch))
    base, extra = divmod(batch, chunks)
    return [base + (i < extra) for i in range(chunks)]


# ----------------------------------------------------------------------------- one micro-batch

StockStep = Callable[[torch.nn.Module, dict, Any], torch.Tensor]


def micro_batch(
    *,
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch,
    estimate: HessianEstimate,
    stock_step: StockStep,
    accelerator,
    estimator: str,
    relative_fd_step: float,
    fd_scheme: str = "forward",
    batch_fraction: float = 1.0,
    chunks: int = 1,
    count_items: Callable[[dict], float],
    last: bool,
) -> torch.Tensor:
    """One micro-batch of a Hessian step; returns the loss the Trainer logs.

    ``stock_step`` is the Trainer's own ``training_step`` (its loss, its scaling for
    accumulation and ``num_items_in_batch``, accelerate's backward), with
    ``compute_loss`` marking the loss for :func:`capture_backward`.  On the last
    micro-batch the estimate is reduced across processes and, for finite
    differences, completed with the gradient at θ.
    """
    if estimator == "finite_difference" and batch_fraction < 1.0:
        loss = _finite_difference_sub_batch(model, inputs, num_items_in_batch, estimate, stock_step, accelerator,
                                            relative_fd_step, batch_fraction, count_items)
    elif estimator == "finite_difference":
        loss = _finite_difference(model, inputs, num_items_in_batch, estimate, stock_step, accelerator,
                                  relative_fd_step, fd_scheme)
    elif batch_fraction < 1.0:
        loss = _exact_sub_batch(model, inputs, num_items_in_batch, estimate, stock_step, accelerator,
                                batch_fraction, count_items)
    else:
        loss = _exact(model, inputs, num_items_in_batch, estimate, stock_step, accelerator, chunks, count_items)
    if last:
        if world_size() > 1:
            estimate.all_reduce_()
        estimate.finish_()
    return loss


@contextlib.contextmanager
def perturbed_pass(model: torch.nn.Module, estimate: HessianEstimate, eps: float, *, scheme: str = "forward",
                   sign: int = 1, accelerator=None):
    """The finite-difference estimator's pass at θ + sign·εz, for the duration.

    Inside: the parameters at θ ± εz (restored bit for bit on exit), the RNG forked (so
    the pass draws the dropout masks the pass at θ draws after it), no DDP reducer, and
    the backward of a marked loss (the Trainer's own step, or ``mark(loss).backward()``)
    folds ±g(θ ± εz) into the estimate, at ``accelerator``'s loss scale.
    """
    with untraced(model, estimate.params), no_sync(model), fsdp_resharded(model), perturbed(estimate, sign * eps), \
            capture_backward(_fd_sink(estimate, accelerator, eps, scheme, sign)):
        yield


def catch_up(*, model, inputs, num_items_in_batch, estimate: HessianEstimate, stock_step: StockStep, accelerator,
             estimator: str, relative_fd_step: float) -> None:
    """A Hessian-only pass on a micro-batch of a step without a scheduled Hessian (the gradient is done).

    The exact estimator differentiates the micro-batch's gradient once more; finite
    differences take a central difference, g(θ + εz) − g(θ − εz), which needs no
    gradient at θ of this micro-batch alone.  Reduced across processes at once: the
    trainer asks for it only on the last micro-batch, after DDP's sync, when every
    process sees the same gradients and so makes the same decision.
    """
    estimate.catch_up = True
    if estimator == "finite_difference":
        eps = fd_epsilon(estimate.params, relative_fd_step)
        for sign, masks in zip((1, -1), same_dropout_masks(model, 2)):
            with perturbed_pass(model, estimate, eps, scheme="central", sign=sign, accelerator=accelerator), masks:
                stock_step(model, inputs, num_items_in_batch)
    else:
        with untraced(model, estimate.params), exact_pass(model, estimate, accelerator, add_grad=False):
            stock_step(model, inputs, num_items_in_batch)
    if world_size() > 1:
        estimate.all_reduce_()
    estimate.finish_()


@contextlib.contextmanager
def exact_pass(model: torch.nn.Module, estimate: HessianEstimate, accelerator=None, *, weight: float = 1.0,
               add_grad: bool = True):
    """The exact estimator's pass, for the duration: a forward with a double backward, its embedding
    lookups through row leaves, and the backward of a marked loss (times ``weight``) folded into the
    estimate at ``accelerator``'s loss scale, with its gradient into ``.grad`` unless ``add_grad=False``."""
    with double_backward_ready(model), compact_lookups(model, estimate.params) as lookups:
        def sink(loss: torch.Tensor) -> None:
            estimate.accumulate(loss * weight if weight != 1.0 else loss, rows=lookups.take(),
                                scale=amp_scale(accelerator), add_grad=add_grad)

        with capture_backward(sink):
            yield


def _exact(model, inputs, num_items, estimate, stock_step, accelerator, chunks, count_items):
    """Gradient and Hessian from one double backward per chunk; only one chunk's graph is alive at a time.

    The estimate is linear in the loss, so chunks weighted by their share of the
    items sum to the whole micro-batch's estimate and gradient.
    """
    if chunks <= 1:
        with exact_pass(model, estimate, accelerator):
            return plain(stock_step(model, inputs, num_items))
    parts = split_batch(inputs, chunk_sizes(_batch_size(inputs), chunks), count_items)
    total = None
    with estimate.probes.kept():  # the same probes for every chunk: drawn once
        for part, share in parts:
            items = None if num_items is None else num_items * share
            with exact_pass(model, estimate, accelerator, weight=share):
                loss = plain(stock_step(model, part, items)) * share
            total = loss if total is None else total + loss
    return total


def _head(inputs, num_items, fraction, count_items):
    """The first ceil(fraction · B) rows, and the item count that normalises their loss as their own mean."""
    keep = max(1, math.ceil(fraction * _batch_size(inputs)))
    ((head, share),) = split_batch(inputs, [keep], count_items)
    # The head's loss is normalised as the head's own mean: its curvature is an estimate
    # of the whole batch's, at the same scale.
    return head, None if num_items is None else num_items * share


def _finite_difference_sub_batch(model, inputs, num_items, estimate, stock_step, accelerator, relative_step,
                                 fraction, count_items):
    """Central differences on the head of the batch, then the Trainer's own step on all of it.

    z ⊙ (g(θ + εz) − g(θ − εz)) / 2ε needs no gradient at θ of the head alone, so a Hessian
    step costs 2·fraction passes more than a plain one: curvature every step for a few
    percent of a step, where a lazy interval would let it go stale.
    """
    head, head_items = _head(inputs, num_items, fraction, count_items)
    eps = fd_epsilon(estimate.params, relative_step) if estimate.difference is None else estimate.difference[0]
    for sign, masks in zip((1, -1), same_dropout_masks(model, 2)):
        with perturbed_pass(model, estimate, eps, scheme="central", sign=sign, accelerator=accelerator), masks:
            stock_step(model, head, head_items)
    return plain(stock_step(model, inputs, num_items))


def _exact_sub_batch(model, inputs, num_items, estimate, stock_step, accelerator, fraction, count_items):
    """A Hessian-only pass on the head of the batch, then the Trainer's own step for the gradient.

    A Hessian pass (forward, backward with a graph, Hessian-vector product) costs
    about three plain steps; on a quarter of the batch about three quarters of one,
    for a noisier estimate.  The gradient stays exact and DDP syncs it as usual.
    """
    head, head_items = _head(inputs, num_items, fraction, count_items)
    # Hessian first: its graph is gone before the full batch's gradient exists.
    with running_stats_kept(model), exact_pass(model, estimate, accelerator, add_grad=False):
        stock_step(model, head, head_items)
    return plain(stock_step(model, inputs, num_items))


def _finite_difference(model, inputs, num_items, estimate, stock_step, accelerator, relative_step, scheme):
    """The same micro-batch at θ + εz (and θ − εz, central), then the Trainer's own step at θ, same dropout masks
    (drawn by the first pass, replayed by the others).

    The perturbed passes go first: their gradients become the estimate and θ is restored
    before the real step's gradient exists, so the step holds one parameter-sized buffer
    more than AdamW's (the estimate, through the pass at θ) and never two.
    """
    params = estimate.params
    eps = fd_epsilon(params, relative_step) if estimate.difference is None else estimate.difference[0]
    signs = (1, -1) if scheme == "central" else (1,)
    passes = same_dropout_masks(model, len(signs) + 1)
    for sign, masks in zip(signs, passes):
        with perturbed_pass(model, estimate, eps, scheme=scheme, sign=sign, accelerator=accelerator), masks:
            stock_step(model, inputs, num_items)
    with next(passes):
        return plain(stock_step(model, inputs, num_items))


# The passes of a finite-difference step on one batch draw their dropout masks once (dropout_masks.py);
# False draws them in every pass, as before (the same step bit for bit, slower on CPU).
REPLAY_DROPOUT_MASKS = True


def same_dropout_masks(model: torch.nn.Module, passes: int) -> Iterator[contextlib.AbstractContextManager]:
    """A context for each of ``passes`` passes on one batch, in turn: the first keeps the dropout masks it draws,
    the others replay them (the last letting each go once used).  Each pass draws its own where the replay is off
    or ``model`` cannot run under it."""
    masks = Masks() if REPLAY_DROPOUT_MASKS and replay_possible(model) else None
    for i in range(passes):
        if masks is None:
            yield contextlib.nullcontext()
        else:
            yield masks.kept() if i == 0 else masks.replayed(last=i == passes - 1)


def _fd_sink(estimate: HessianEstimate, accelerator, eps: float, scheme: str, sign: int):
    params = estimate.params

    def sink(loss: torch.Tensor) -> None:
        # A plain backward into .grad (reentrant checkpointing refuses autograd.grad), with the
        # gradients of earlier micro-batches set aside meanwhile.
        kept = [p.grad for p in params]
        with perturbed_gradients(estimate) as grads:
            loss.backward()
        for p, g in zip(params, kept):
            p.grad = g
        add_perturbed_gradients(estimate, grads, eps, scale=amp_scale(accelerator), scheme=scheme, sign=sign)
    return sink
