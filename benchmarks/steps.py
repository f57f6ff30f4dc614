"""One optimizer step of each kind, phase by phase, built from the package's own pieces.

The phases are what ``AdaHessianTrainer`` runs on a Hessian step (``hessian_pass.micro_batch``),
cut where the profiles need a timer or a ``torch.profiler`` range; every piece is the
library's, so a change to the trainer's path changes what is measured here:

* ``hessian_pass.double_backward_ready(model)`` around the exact estimator's forward
  and double backward (DDP no_sync, attention with a double backward, SDPA's math kernel),
  with ``lookups.compact_lookups`` (embedding lookups through row leaves), as ``exact_pass`` has;
* ``optimizer.estimate()`` and ``est.accumulate(grads=..., rows=..., row_grads=...)``, with the
  gradient built first by ``estimators.gradients_with_graph`` so that the gradient-with-graph
  and the Hessian-vector product are timed apart (``est.accumulate(loss)`` does both);
* for finite differences, ``estimators.fd_epsilon`` and the trainer's own
  ``hessian_pass.perturbed_pass`` (θ ± εz and back, the gradient folded in), the plain pass
  at θ and ``est.finish_()`` (forward or central, the optimizer's ``fd_scheme``), the dropout
  masks drawn by the first pass on a batch and replayed by the others (``hessian_pass.same_dropout_masks``);
* for ``hessian_batch_fraction``, ``hessian_pass.split_batch`` cuts the head of the batch.

A step function takes ``phase``: a function of a phase name that returns a context
manager (a :class:`PhaseTimer`, ``torch.profiler.record_function``, or both).
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from typing import Callable, ContextManager

import torch
from torch.profiler import record_function

from hf_adahessian import AdaHessian
from hf_adahessian.clipping import clip_grad_norm_measured_
from hf_adahessian.estimators import fd_epsilon, gradients_with_graph
from hf_adahessian.hessian_pass import (chunk_sizes, double_backward_ready, mark, perturbed_pass, same_dropout_masks,
                                       split_batch)
from hf_adahessian.lookups import compact_lookups
from hf_adahessian.probes import estimate_dtype

Phase = Callable[[str], ContextManager]
MAX_GRAD_NORM = 1.0  # the Trainer's default clipping


def no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


class PhaseTimer:
    """Wall-clock seconds per phase of one step (summed when a phase repeats); with
    ``ranges=True`` each phase is also a ``torch.profiler.record_function`` range."""

    def __init__(self, ranges: bool = False):
        self.seconds: dict[str, float] = {}
        self.ranges = ranges

    @contextlib.contextmanager
    def __call__(self, name: str):
        with record_function(name) if self.ranges else contextlib.nullcontext():
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def measure(kinds: dict, warmup: int, repeats: int, shuffle: bool = False) -> tuple[dict, dict, float]:
    """Interleaved rounds, one step of each kind a round; per kind and phase the median, min and first-round
    seconds.  ``shuffle``: each round in its own random order (seeded by the round), so that no kind always
    follows the same one (the Hessian step's memory churn, say) into the next."""
    rounds = {k: [] for k in kinds}
    start = time.perf_counter()
    for i in range(warmup + repeats):
        order = list(kinds)
        if shuffle:
            random.Random(i).shuffle(order)
        for kind in order:
            timer = PhaseTimer()
            kinds[kind](timer)
            t = dict(timer.seconds)
            t["total"] = sum(t.values())
            rounds[kind].append(t)
        print(f"round {i + 1}/{warmup + repeats}: " + ", ".join(
            f"{k} {rounds[k][-1]['total']:.3f}s" for k in kinds), flush=True)
    measure_s = time.perf_counter() - start
    summary = {}
    for kind, rs in rounds.items():
        measured = rs[warmup:]
        summary[kind] = {phase: {"median_s": statistics.median(r[phase] for r in measured),
                                 "min_s": min(r[phase] for r in measured), "first_round_s": rs[0][phase]}
                         for phase in rs[0]}
    return summary, rounds, measure_s


def finish_step(optimizer, params, phase: Phase, update: str = "update", max_grad_norm: float = MAX_GRAD_NORM):
    """Clipping as the Trainer's (for AdaHessian, the norm and each gradient's norm told to the step), ``step()``,
    ``zero_grad(set_to_none=True)``, in turn."""
    if max_grad_norm and max_grad_norm > 0:
        with phase("clip"):
            if isinstance(optimizer, AdaHessian):
                norm, measured = clip_grad_norm_measured_(params, max_grad_norm)
                optimizer.gradient_clipped_by_norm(norm, max_grad_norm, measured)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    with phase(update):
        optimizer.step()
    with phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)


def backward_step(model, batch: dict, optimizer, params, phase: Phase = no_phase, create_graph: bool = False,
                  max_grad_norm: float = MAX_GRAD_NORM):
    """forward, backward, clip, ``step()``, zero_grad; returns the loss.

    AdamW's step, AdaHessian's between two estimates, and with ``create_graph`` the peers'
    Hessian steps: ``backward(create_graph=True)`` under ``double_backward_ready``, then their
    ``step()`` draws the probes and makes Hz.
    """
    with double_backward_ready(model) if create_graph else contextlib.nullcontext():
        with phase("forward"):
            loss = model(**batch).loss
        with phase("backward (graph)" if create_graph else "backward"):
            loss.backward(create_graph=create_graph)
    loss = loss.detach()
    finish_step(optimizer, params, phase, "update (with Hessian)" if create_graph else "update", max_grad_norm)
    return loss


def _exact_pass(model, rows: dict, estimate, phase: Phase, add_grad: bool, forward: str = "forward",
                weight: float = 1.0):
    """The exact estimator on ``rows``: forward (its loss times ``weight``), gradient with its graph,
    Hessian-vector product."""
    with double_backward_ready(model), compact_lookups(model, estimate.params) as lookups:
        with phase(forward):
            loss = model(**rows).loss
            loss = loss * weight if weight != 1.0 else loss
        with phase("grad (graph)"):
            leaves = lookups.take()
            grads, row_grads = gradients_with_graph(loss, estimate.params, leaves)
        with phase("Hessian-vector"):
            estimate.accumulate(grads=grads, rows=leaves, row_grads=row_grads, add_grad=add_grad)
    value = loss.detach()
    del loss, grads  # the double-backward graph is gone before the update
    return value


def exact_hessian_step(model, batch: dict, optimizer, phase: Phase = no_phase):
    """AdaHessian's exact Hessian step on the whole batch (``hessian_batch_fraction=1``)."""
    estimate = optimizer.estimate()
    loss = _exact_pass(model, batch, estimate, phase, add_grad=True)
    params = estimate.params
    del estimate  # from here only the optimizer holds it, until step() consumes it (as in the Trainer)
    finish_step(optimizer, params, phase)
    return loss


def forward_over_reverse_hessian_step(model, batch: dict, optimizer, phase: Phase = no_phase):
    """The exact estimate the other way round, which the package does not take: Hz as the forward-mode
    derivative of the gradient along z (a forward on dual parameters θ + z·ε, then an ordinary backward
    whose every product carries its tangent), instead of the reverse-mode derivative of g·z.

    Forward over reverse keeps no graph of the backward (the reason it is the usual choice for
    Hessian-vector products elsewhere), so it is the one candidate for the exact full-batch estimate
    in bounded memory without chunks; ``memory_hessian_step`` and ``profile_hessian_step`` measure
    it against the pass the package takes. The probes are the optimizer's: the estimate is the
    same to fp32 rounding (``tests/test_benchmark_steps.py``).
    """
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    estimate = optimizer.estimate()
    params = estimate.params
    names = {id(p): n for n, p in model.named_parameters()}
    with double_backward_ready(model), fwAD.dual_level():
        primals = [p.detach().requires_grad_() for p in params]
        with phase("forward (dual)"):
            duals = {names[id(p)]: fwAD.make_dual(q, estimate.probe(i, dtype=p.dtype))
                     for i, (p, q) in enumerate(zip(params, primals))}
            loss = functional_call(model, duals, (), dict(batch)).loss
            del duals
        with phase("grad (dual)"):
            grads = torch.autograd.grad(loss, primals, allow_unused=True)
        with phase("Hessian-vector"), torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue
                primal, tangent = fwAD.unpack_dual(g)
                p.grad = primal.detach()
                if tangent is not None:
                    estimate.add_(i, tangent.to(estimate_dtype(tangent)))
            estimate.made_gradients = True
            estimate.micro_batches += 1
            del grads
    value = fwAD.unpack_dual(loss).primal.detach()
    del loss, primals, estimate
    finish_step(optimizer, params, phase)
    return value


def count_labels(rows: dict) -> float:
    """What the Trainer counts for ``num_items_in_batch`` on a classification batch: labels not ignored."""
    return float(rows["labels"].ne(-100).sum())


def sub_batch_hessian_step(model, batch: dict, optimizer, fraction: float, phase: Phase = no_phase):
    """``hessian_batch_fraction``: the Hessian alone on the head of the batch, then the gradient on all of it."""
    estimate = optimizer.estimate()
    rows = batch["labels"].shape[0]
    ((head, _share),) = split_batch(batch, [max(1, math.ceil(fraction * rows))], count_labels)
    _exact_pass(model, head, estimate, phase, add_grad=False, forward="Hessian forward")
    with phase("forward"):
        loss = model(**batch).loss
    with phase("backward"):
        loss.backward()
    params = estimate.params
    del estimate
    finish_step(optimizer, params, phase)
    return loss.detach()


def _difference_step(model, batch: dict, perturbed_batch: dict, optimizer, scheme: str, phase: Phase,
                     label: str = ""):
    """The perturbed passes on ``perturbed_batch`` (θ + εz, and θ − εz for central), then the
    ordinary forward and backward on ``batch`` at θ, ``finish_()`` and the update."""
    estimate = optimizer.estimate()
    params = estimate.params
    eps = fd_epsilon(params, optimizer.relative_fd_step())
    # The first pass on a batch keeps its dropout masks, the passes after it on the same batch replay them.
    signs = (1, -1) if scheme == "central" else (1,)
    whole = perturbed_batch is batch
    passes = same_dropout_masks(model, len(signs) + whole)
    for sign, masks in zip(signs, passes):
        at = "θ+εz" if sign > 0 else "θ−εz"
        with contextlib.ExitStack() as moved:
            with phase(f"perturb {at}"):
                moved.enter_context(perturbed_pass(model, estimate, eps, scheme=scheme, sign=sign))
            with masks:
                with phase(f"forward{label} ({at})"):
                    loss = model(**perturbed_batch).loss
                with phase(f"grad{label} ({at})"):
                    mark(loss).backward()
            del loss
            with phase(f"restore θ from {at}"):
                moved.close()
    with next(passes) if whole else contextlib.nullcontext():
        with phase("forward"):
            loss = model(**batch).loss
        with phase("backward"):
            loss.backward()
    with phase("difference"):
        estimate.finish_()
    del estimate
    finish_step(optimizer, params, phase)
    return loss.detach()


def finite_difference_hessian_step(model, batch: dict, optimizer, phase: Phase = no_phase):
    """AdaHessian's finite-difference Hessian step: the pass at θ + εz (and θ − εz, central), then at θ.

    With the trainer's own ``hessian_pass.perturbed_pass``: the perturbed passes first (θ ± εz,
    the RNG forked, each gradient folded into the estimate as ±g(θ ± εz), θ restored bit
    for bit on exit); then the ordinary forward and backward at θ, and ``finish_()`` makes
    Hz ≈ (g(θ + εz) − g(θ)) / ε (forward) or (g(θ + εz) − g(θ − εz)) / 2ε (central).
    """
    return _difference_step(model, batch, batch, optimizer, optimizer.fd_scheme, phase)


def chunked_hessian_step(model, batch: dict, optimizer, chunks: int, phase: Phase = no_phase):
    """``hessian_chunks``: the exact estimator on consecutive chunks of the batch, each weighted by its
    share of the items (the whole batch's estimate and gradient), one chunk's graph at a time."""
    estimate = optimizer.estimate()
    rows = batch["labels"].shape[0]
    parts = split_batch(batch, chunk_sizes(rows, chunks), count_labels)
    with estimate.probes.kept():  # as the trainer: one draw of the probes for all chunks
        total = sum(float(_exact_pass(model, part, estimate, phase, add_grad=True, weight=share))
                    for part, share in parts)
    params = estimate.params
    del estimate
    finish_step(optimizer, params, phase)
    return total


def chunk_parameter_passes(model, seed: int = 0):
    """A step function: the work every chunk of ``hessian_chunks`` repeats over the parameters, alone.

    The parameters are those outside embeddings (whose lookups read row leaves); per call: their
    kept int8 probes' float copy (the second backward's cotangent), a fresh gradient and a fresh Hz
    (filled, standing in for the backwards that make them), Hz added to the sums, the gradient to
    ``.grad``.  The floor of what a chunk costs beyond its share of the double backward.
    """
    from hf_adahessian.probes import Probes

    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in lookups]
    probes = [Probes(seed, 1).draw(i, p) for i, p in enumerate(params)]
    sums = [torch.zeros_like(p) for p in params]
    grads = [torch.zeros_like(p) for p in params]

    def step(phase: Phase = no_phase):
        with phase("probes' float copy"):
            cotangents = [z.to(p.dtype) for z, p in zip(probes, params)]
        with phase("fresh gradient and Hz"):
            g = [torch.empty_like(p).fill_(1.0) for p in params]
            hz = [torch.empty_like(p).fill_(1.0) for p in params]
        with phase("Hz into the sums, gradient into .grad"):
            for acc, term in zip(sums + grads, hz + g):
                acc.add_(term)
        del cotangents, g, hz

    return step, sum(p.numel() for p in params)


def fd_sub_batch_hessian_step(model, batch: dict, optimizer, fraction: float, phase: Phase = no_phase):
    """``hessian_batch_fraction`` with finite differences: central differences on the head of the
    batch (``hessian_pass.perturbed_pass`` at θ ± εz), then the ordinary gradient on all of it."""
    rows = batch["labels"].shape[0]
    ((head, _share),) = split_batch(batch, [max(1, math.ceil(fraction * rows))], count_labels)
    return _difference_step(model, batch, head, optimizer, "central", phase, label=" on the head")

