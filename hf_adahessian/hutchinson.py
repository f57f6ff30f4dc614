"""Hutchinson's estimate of the Hessian diagonal, usable without the optimizer.

For a Rademacher vector z (entries ±1), E[z ⊙ Hz] = diag(H): the off-diagonal
terms cancel in expectation because E[z_i z_j] = 0 for i ≠ j and z_i² = 1.  The
Hessian-vector product Hz comes from differentiating g·z, where g is a gradient
built with ``create_graph=True``; it costs several backward passes (3.7× a plain
backward for MiniLM on CPU: BENCHMARKS.md, "Step profile").
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "ProbeGenerator",
    "rademacher_like",
    "hessian_vector_products",
    "hutchinson_diagonal",
    "block_average",
]


class ProbeGenerator:
    """One ``torch.Generator`` per device, all seeded alike, never the global RNG.

    Keeping the probes off the global RNG means that switching optimizers does
    not change dropout masks or data order, and that the probe stream can be
    saved in a checkpoint and resumed exactly.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}

    def for_device(self, device: torch.device) -> torch.Generator:
        key = str(torch.device(device))
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    def state_dict(self) -> dict:
        states = dict(self._pending_states)
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        # Generators are made lazily on first use, on whatever device the
        # parameters then live: a state saved for "cuda:0" waits until then.
        self._pending_states = {k: v.detach().cpu().to(torch.uint8) for k, v in state["states"].items()}


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
) -> list[torch.Tensor | None]:
    """Hv for each parameter, differentiating ``sum(g·v)`` through the grads' graph.

    ``grads`` must have been made with ``create_graph=True``.  A parameter that
    the gradients do not depend on gets ``None`` (its Hessian block is zero).
    """
    total = sum(_ProbeDot.apply(g, v) for g, v in zip(grads, vectors))
    return list(torch.autograd.grad(total, list(params), retain_graph=retain_graph, allow_unused=True))


def hutchinson_diagonal(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    probes: ProbeGenerator,
    n_samples: int = 1,
    scale: float = 1.0,
) -> list[torch.Tensor]:
    """Mean over ``n_samples`` probes of z ⊙ Hz / scale, in fp32 or wider, one tensor per parameter.

    The sign is kept: across micro-batches or processes the estimates are summed
    before the absolute value is taken, as for one large batch.  Every parameter
    gets a probe (drawn in order) even when its gradient carries no graph, so the
    probe stream does not depend on which parameters happen to have a Hessian
    path; those parameters get an estimate of zero.
    """
    estimates: list[torch.Tensor | None] = [None] * len(params)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    for sample in range(n_samples):
        zs = [rademacher_like(p, probes.for_device(p.device), torch.int8) for p in params]
        if not live:
            continue
        hvs = hessian_vector_products(
            [grads[i] for i in live],
            [params[i] for i in live],
            [zs[i] for i in live],
            retain_graph=sample < n_samples - 1,
        )
        for i, hv in zip(live, hvs):
            if hv is None:
                continue
            # Hv is a fresh tensor that nothing else holds: z ⊙ Hv is made in it.
            term = hv.to(torch.promote_types(hv.dtype, torch.float32)).mul_(zs[i])
            estimates[i] = term if estimates[i] is None else estimates[i].add_(term)
        del zs, hvs
    factor = 1.0 / (n_samples * scale)
    for i, p in enumerate(params):
        if estimates[i] is None:
            estimates[i] = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        elif factor != 1.0:
            estimates[i].mul_(factor)
    return estimates


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
