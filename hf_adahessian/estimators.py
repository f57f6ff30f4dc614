"""How Hz is obtained for a probe z: the estimators that feed a :class:`HessianEstimate`.

* ``exact`` (the paper's): differentiate g·z through the graph of a gradient built
  with ``create_graph=True``.  Exact, but it differentiates the backward itself, so
  it needs kernels with a double backward and costs about three plain backwards.
* ``finite_difference``: Hz ≈ (∇L(θ + εz) − ∇L(θ)) / ε, from two ordinary gradient
  passes, so it runs wherever a plain backward runs (fused attention kernels,
  torch.compile, reentrant checkpointing) and keeps no double-backward graph.
  Its error is O(ε); ε is relative to the parameters' norm (``fd_epsilon``).

Each estimator adds the terms of one micro-batch to the estimate; the Trainer
hook (``hessian_pass.py``) and the standalone optimizer call them alike.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .lookups import RowLeaf
from .probes import Probes, estimate_dtype, is_dtensor

if TYPE_CHECKING:
    from .estimate import HessianEstimate

__all__ = [
    "hessian_vector_products",
    "hutchinson_diagonal",
    "accumulate_exact",
    "gradients_with_graph",
    "fd_epsilon",
    "perturbed",
    "add_perturbed_gradients",
    "FD_STEP",
]


# ---------------------------------------------------------------------------- exact


class _ProbeDot(torch.autograd.Function):
    """Σ g ⊙ z for an int8 probe z, as far as autograd is concerned.

    Differentiating Σ g ⊙ z through g's graph gives Hz.  Only that gradient is
    ever used, never the product itself, so the forward returns a zero instead
    of computing it (a parameter-sized conversion and dot product saved), and
    autograd keeps only the int8 probe: written as a plain product, it would
    hold a float copy of every probe until the Hessian-vector product is done.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return g.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (z,) = ctx.saved_tensors
        return z.to(grad_out.dtype).mul_(grad_out), None


def hessian_vector_products(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    retain_graph: bool = False,
    seed_gradient: float = 1.0,
    release_grads: bool = False,
) -> list[torch.Tensor | None]:
    """``seed_gradient`` · Hv for each parameter, differentiating ``sum(g·v)`` through the grads' graph.

    ``grads`` must have been made with ``create_graph=True``.  A parameter that
    the gradients do not depend on gets ``None`` (its Hessian block is zero).
    ``seed_gradient`` scales every cotangent of the second backward: under fp16
    it keeps that backward's intermediates in range when the first one ran at a
    large loss scale.  ``release_grads``: ``grads`` (a list) is emptied before the
    second backward; the graph needs what made the gradients, not the gradients, so
    whatever no one else holds is freed before the product's own tensors are made.
    """
    total = sum(_ProbeDot.apply(g, v) for g, v in zip(grads, vectors))
    if release_grads:
        grads.clear()
    seed = torch.full_like(total, seed_gradient)
    try:
        return list(torch.autograd.grad(total, list(params), grad_outputs=seed, retain_graph=retain_graph,
                                        allow_unused=True))
    except RuntimeError as err:
        if "derivative for" in str(err) and "not implemented" in str(err):
            raise RuntimeError(NO_DOUBLE_BACKWARD_MESSAGE.format(error=str(err).splitlines()[0])) from err
        raise


NO_DOUBLE_BACKWARD_MESSAGE = (
    "AdaHessian's exact Hessian-vector product needs a double backward, and an operation in this model "
    "has none ({error}). With Hugging Face attention on CPU or CUDA, run the Hessian step's forward under "
    "hf_adahessian.double_backward_ready(model) (SDPA's math kernel), or load the model with "
    "attn_implementation=\"eager\"; or use hessian_estimator=\"finite_difference\", which needs only "
    "ordinary backwards; AdaHessianTrainer does the first for you."
)


def _exact_terms(grads, params, probes: Probes, n_samples: int, seed_gradient: float, apply_probe: bool = True,
                 rows: Sequence[RowLeaf] = (), row_grads: Sequence[torch.Tensor | None] = (), release: bool = False):
    """Σ_samples z ⊙ seed·Hz, one probe set at a time: {index: term} for the parameters with a Hessian
    path, and {k: term} for the row leaves ``rows[k]`` of embedding lookups (their rows of the probe).

    ``apply_probe=False`` (one sample only) leaves out the product by z: the terms are seed·Hz,
    whose absolute value is the same.  ``release``: ``grads`` (a list) loses its gradients before
    the last product, which then frees the ones no one else holds.
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    live_rows = [k for k, g in enumerate(row_grads) if g is not None and g.requires_grad]
    terms: dict[int, torch.Tensor] = {}
    row_terms: dict[int, torch.Tensor] = {}
    for sample in range(n_samples):
        if not live and not live_rows:
            break
        zs = {i: probes.draw(i, params[i], sample) for i in live}
        row_zs = [zs[r.param].index_select(0, r.index) if r.param in zs
                  else probes.draw_rows(r.param, params[r.param], r.index, sample)
                  for r in (rows[k] for k in live_rows)]
        last = sample == n_samples - 1
        outputs = [grads[i] for i in live] + [row_grads[k] for k in live_rows]
        if release and last:
            for i in live:
                grads[i] = None
        hvs = hessian_vector_products(outputs, [params[i] for i in live] + [rows[k].leaf for k in live_rows],
                                      [zs[i] for i in live] + row_zs, retain_graph=not last,
                                      seed_gradient=seed_gradient, release_grads=release and last)
        targets = [(terms, i, zs[i]) for i in live] + [(row_terms, k, z) for k, z in zip(live_rows, row_zs)]
        for (out, key, z), hv in zip(targets, hvs):
            if hv is None:
                continue
            # Hv is a fresh tensor that nothing else holds: z ⊙ Hv is made in it.
            term = hv.to(estimate_dtype(hv))
            if apply_probe:
                term.mul_(z)
            out[key] = term if key not in out else out[key].add_(term)
        del zs, row_zs, hvs
    return terms, row_terms


def hutchinson_diagonal(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    probes: Probes,
    n_samples: int = 1,
    scale: float = 1.0,
) -> list[torch.Tensor]:
    """Mean over ``n_samples`` probes of z ⊙ Hz / scale, in fp32 or wider, one tensor per parameter.

    The functional form, usable without the optimizer.  A parameter without a
    Hessian path (no gradient, or a gradient without a graph) gets zeros.
    """
    terms, _ = _exact_terms(grads, params, probes, n_samples, 1.0)
    out = []
    for i, p in enumerate(params):
        t = terms.get(i)
        if t is None:
            t = torch.zeros_like(p, dtype=estimate_dtype(p))
        elif n_samples * scale != 1.0:
            t.mul_(1.0 / (n_samples * scale))
        out.append(t)
    return out


def gradients_with_graph(loss: torch.Tensor, params: Sequence[torch.Tensor], rows: Sequence[RowLeaf] = ()
                         ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The gradient with its graph (``create_graph=True``) for each parameter and each row leaf."""
    if not params:
        raise ValueError(NO_PARAMETERS_MESSAGE)
    out = torch.autograd.grad(loss, list(params) + [r.leaf for r in rows], create_graph=True, allow_unused=True)
    return list(out[:len(params)]), list(out[len(params):])


def accumulate_exact(
    estimate: HessianEstimate,
    loss: torch.Tensor | None = None,
    *,
    grads: Sequence[torch.Tensor | None] | None = None,
    rows: Sequence[RowLeaf] = (),
    row_grads: Sequence[torch.Tensor | None] | None = None,
    scale: float = 1.0,
    hessian_scale: float | None = None,
    add_grad: bool = True,
) -> None:
    """Add one micro-batch's z ⊙ Hz / scale to ``estimate`` and, with ``add_grad``, its gradient to ``.grad``.

    ``loss`` is the micro-batch loss exactly as it would go to ``backward()``
    (already divided for accumulation, already multiplied by an AMP loss scale
    ``scale``); or pass ``grads`` made with ``create_graph=True``.  ``rows`` are the
    row leaves of the forward's embedding lookups (``lookups.compact_lookups``); with
    ``grads``, ``row_grads`` are theirs.  The estimate is stored unscaled; ``.grad``
    stays scaled for the GradScaler.  ``hessian_scale`` (≤ ``scale``) is the scale the
    second backward runs at.  The double-backward graph is released before this returns.

    With ``add_grad`` the parameters' gradients go into ``.grad`` first and are let go
    before the last Hessian-vector product: after a micro-batch or chunk that made
    ``.grad``, a parameter-sized gradient less is alive during the second backward
    (``grads`` given as a list is taken over, its entries set to None, for that).  The
    row leaves' gradients, a few rows each, go in afterwards: the first one makes an
    embedding-sized ``.grad``, better made once the second backward's tensors are gone.
    """
    params = estimate.params
    if grads is None:
        if loss is None:
            raise ValueError("accumulate needs either a loss or grads.")
        grads, row_grads = gradients_with_graph(loss, params, rows)
    elif rows and row_grads is None:
        raise ValueError("accumulate with grads and rows needs row_grads, the row leaves' gradients.")
    grads = grads if isinstance(grads, list) else list(grads)
    row_grads = row_grads if isinstance(row_grads, list) else list(row_grads or ())
    if len(grads) != len(params):
        raise ValueError(f"accumulate got {len(grads)} grads for {len(params)} trainable parameters.")
    if add_grad:
        _add_to_grad(estimate, grads)
    seed_gradient = 1.0 if hessian_scale is None else min(1.0, hessian_scale / scale)
    terms, row_terms = _exact_terms(grads, params, estimate.probes, estimate.n_samples, seed_gradient,
                                    apply_probe=estimate.probe_applied, rows=rows, row_grads=row_grads,
                                    release=add_grad)
    factor = 1.0 / (estimate.n_samples * scale * seed_gradient)
    with torch.no_grad():
        for i, term in terms.items():
            estimate.add_(i, term.mul_(factor) if factor != 1.0 else term)
        for k, term in row_terms.items():
            estimate.add_rows_(rows[k].param, rows[k].index, term.mul_(factor) if factor != 1.0 else term)
        if add_grad:
            for r, g in zip(rows, row_grads):
                if g is None:
                    continue
                p = estimate.params[r.param]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.index_add_(0, r.index, g.detach())
    estimate.micro_batches += 1


@torch.no_grad()
def _add_to_grad(estimate: HessianEstimate, grads) -> None:
    """The micro-batch's gradient into ``.grad``: the first one as it is, the next ones added."""
    estimate.made_gradients = True
    for p, g in zip(estimate.params, grads):
        if g is None:
            continue
        g = g.detach()
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


NO_PARAMETERS_MESSAGE = "AdaHessian has no trainable parameters: every parameter it was given has requires_grad=False."


# ---------------------------------------------------------------------------- finite differences

# The perturbation ε·z has norm FD_STEP[scheme][dtype]·‖θ‖, by the dtype the forward
# computes in (the autocast dtype under mixed precision).  A forward difference errs by
# O(ε) (truncation) plus the gradient's rounding / ε, a central one by O(ε²) plus the
# same rounding.  Measured on a 2-layer BERT with dropout (tests/test_finite_difference.py,
# relative L2 to the exact z ⊙ Hz for the same z): forward fp32 at 1e-3: 0.3%; forward
# under bf16 autocast at 3e-2: 10%; central under bf16 at 3e-2: 2%.
FD_STEP = {
    "forward": {torch.float64: 1e-5, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2},
    "central": {torch.float64: 1e-4, torch.float32: 3e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2},
}


def fd_epsilon(params: Sequence[torch.Tensor], relative_step: float) -> float:
    """ε such that ‖εz‖ = relative_step · ‖θ‖ (z of ±1 entries: ‖z‖² is the parameter count)."""
    if not params:
        return relative_step
    # At least fp32 (a bf16 norm of millions of entries loses digits), never narrower than θ (fp64 models).
    # A sharded (FSDP2) parameter's norm is completed across its shards: every rank takes the same ε.
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    norms = torch.stack([(n.full_tensor() if is_dtensor(n) else n).to(norms[0].device, torch.float64)
                         for n in norms])
    theta = float(torch.linalg.vector_norm(norms))
    count = sum(p.numel() for p in params)
    theta = theta if math.isfinite(theta) and theta > 0 else 1.0
    return relative_step * theta / math.sqrt(count)


@contextlib.contextmanager
def perturbed(estimate: HessianEstimate, eps: float):
    """θ ← θ + εz for the duration, then θ restored bit for bit.

    Restoring subtracts εz again and puts back the few entries whose round trip rounds differently
    (``Probes.perturb_``): no copy of the parameters is alive during the perturbed pass, where a copy
    made the finite-difference step's peak memory one parameter-sized buffer above AdamW's backward.
    Nothing may change θ inside.
    """
    params = estimate.params
    with torch.no_grad():
        records = [estimate.probes.perturb_(i, p, eps) for i, p in enumerate(params)]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, record in zip(params, records):
                estimate.probes.restore_(p, eps, record)
        del records


def add_perturbed_gradients(estimate: HessianEstimate, grads: Sequence[torch.Tensor | None], eps: float,
                            scale: float = 1.0, scheme: str = "forward", sign: int = 1) -> None:
    """Add ``sign`` · g(θ + sign·εz) / scale; ``finish_`` completes the difference.

    Forward: ``finish_`` subtracts g(θ) and divides by ε.  Central: the sums hold
    g(θ + εz) − g(θ − εz) once both signs are in, and ``finish_`` divides by 2ε.  The sums then
    hold Hz, whose absolute value is |z ⊙ Hz| (see ``HessianEstimate``): z is never applied.
    """
    estimate._set_difference(eps, scale, scheme)
    with torch.no_grad():
        for i, g in enumerate(grads):
            if g is None:
                continue
            # The caller hands over g(θ ± εz), which nothing else needs: the sum is made in it.
            term = g.detach().to(estimate_dtype(g))
            factor = sign / scale
            estimate.add_(i, term.mul_(factor) if factor != 1.0 else term)
    if sign > 0:
        estimate.micro_batches += 1


@contextlib.contextmanager
def perturbed_gradients(estimate: HessianEstimate):
    """For a backward at θ ± εz: ``.grad`` cleared for it, and the list it fills, of what it left per parameter.

    On a step's first such backward the parameters' ``.grad`` are zeroed views of one buffer, which it
    accumulates into and the estimate then keeps as its sums: one allocation, returned whole when the
    step is done, where a gradient per parameter kept through the next pass left the allocator's heap
    fragmented.  A parameter the backward does not reach gets None, as without the buffer.  Later ones
    (another micro-batch, the second sign), and parameters that do not share one device and their
    estimate's dtype (a view must have its parameter's dtype to be its ``.grad``) or are sharded, take
    autograd's own gradients.  The caller puts ``.grad`` back.
    """
    params = estimate.params
    grads: list[torch.Tensor | None] = []
    views = _one_buffer(estimate)
    if views is None:
        for p in params:
            p.grad = None
        yield grads
        grads.extend(p.grad for p in params)
        return
    reached: set[int] = set()
    hooks = []
    for i, (p, view) in enumerate(zip(params, views)):
        p.grad = view
        hooks.append(p.register_post_accumulate_grad_hook(lambda _, i=i: reached.add(i)))
    try:
        yield grads
    finally:
        for hook in hooks:
            hook.remove()
    grads.extend(p.grad if i in reached else None for i, p in enumerate(params))


def _one_buffer(estimate: HessianEstimate) -> list[torch.Tensor] | None:
    params = estimate.params
    if not params or any(s is not None for s in estimate.sums):
        return None
    device, dtype = params[0].device, params[0].dtype
    if any(p.device != device or p.dtype != dtype or dtype != estimate_dtype(p) or is_dtensor(p)
           or p.layout != torch.strided for p in params):
        return None
    flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
    return [view.view(p.shape) for view, p in zip(flat.split([p.numel() for p in params]), params)]


def rng_devices(params: Sequence[torch.Tensor]) -> list[int]:
    """The CUDA devices whose RNG a forward may draw from (dropout), for ``torch.random.fork_rng``."""
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def closure_difference(estimate: HessianEstimate, closure: Callable[[], torch.Tensor], relative_step: float,
                       scheme: str = "forward"):
    """The standalone finite-difference step: the closure at θ (the step's gradient), then at θ ± εz.

    The closure zeroes the gradients, computes the loss and calls ``backward()``, as
    for torch's LBFGS.  The perturbed calls replay the first one's RNG state, so
    dropout draws the same masks; their gradients are folded into the estimate and
    ``.grad`` is given back the first call's.
    """
    params = estimate.params
    devices = rng_devices(params)
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    with torch.enable_grad():
        loss = closure()
    kept = [p.grad for p in params]
    eps = fd_epsilon(params, relative_step)
    for sign in ((1, -1) if scheme == "central" else (1,)):
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)
            with perturbed(estimate, sign * eps), torch.enable_grad():
                for p in params:
                    p.grad = None
                closure()
                add_perturbed_gradients(estimate, [p.grad for p in params], eps, scheme=scheme, sign=sign)
    for p, g in zip(params, kept):
        p.grad = g
    estimate.finish_()
    return loss
