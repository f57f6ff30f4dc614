"""AdaHessian (Yao, Gholami et al., AAAI 2021): Adam with a Hessian-diagonal denominator.

    m_t = β1 m_{t-1} + (1 − β1) g_t
    v_s = β2 v_{s-1} + (1 − β2) D_s²            on Hessian steps only (s counts them)
    p  ← p − lr·wd·p                            decoupled weight decay
    p  ← p − lr · m̂_t / ((√v̂_s)^k + eps)        m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^s)

D is Hutchinson's |z ⊙ Hz| averaged over blocks (see ``hutchinson.py``).  As in
``torch/optim/adam.py``, one class holds groups, state and validation, and a
functional core below it has a for-loop and a ``foreach`` implementation.

Two ways to feed it the Hessian:

* standalone, as the earlier AdaHessian packages: ``loss.backward(create_graph=True)``
  then ``step()``, which takes Hz from the gradients' graph and frees it;
* micro-batch by micro-batch (what the Trainer does): ``accumulate_hessian(loss)``
  for each, then ``step()`` consumes the accumulated estimate.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from .hutchinson import ProbeGenerator, block_average_, hutchinson_diagonal

__all__ = ["AdaHessian", "adahessian"]

_STATE_KEYS = ("exp_avg", "exp_hessian_diag_sq")

NO_GRAPH_MESSAGE = (
    "AdaHessian needs a Hessian-vector product on this step (hessian_interval={interval}, "
    "optimizer step {step}), but no parameter's gradient carries a graph. Call "
    "loss.backward(create_graph=True) before optimizer.step(), call "
    "optimizer.accumulate_hessian(loss) for each micro-batch, or train with "
    "hf_adahessian.AdaHessianTrainer, which does this for you."
)


def _check(name: str, ok: bool, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"AdaHessian: invalid {name}={value!r}; expected {expected}.")


def _check_int(name: str, value, minimum: int = 1) -> None:
    _check(name, isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           value, f"an integer >= {minimum}")


def _validate_group_hyperparameters(lr, betas, eps, weight_decay, hessian_power, block_size) -> None:
    _check("lr", isinstance(lr, (int, float)) and lr > 0, lr, "a positive number (recipes use 0.15 from scratch, "
           "~1e-3 to 3e-2 for fine-tuning)")
    _check("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), betas, "two numbers in [0, 1)")
    _check("eps", eps > 0, eps, "a positive number (the authors' recipes use 1e-4)")
    _check("weight_decay", weight_decay >= 0, weight_decay, "a number >= 0")
    _check("hessian_power", 0.0 <= hessian_power <= 1.0, hessian_power, "a number in [0, 1] (1 or 0.5 in the recipes)")
    _check_int("block_size", block_size)


class AdaHessian(Optimizer):
    """AdaHessian, with decoupled weight decay, lazy Hessian updates and fp32 state.

    Args:
        params: parameters or parameter groups (per-group ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``hessian_power``, ``block_size``, ``average_conv_kernel``).
        lr: learning rate; AdaHessian's step is scale-free, so it is far larger than
            Adam's (0.15 in the authors' from-scratch recipes).
        betas: decay of the gradient and squared-Hessian moving averages.
        eps: added to the denominator; 1e-4 in the authors' recipes.
        weight_decay: decoupled (AdamW-style) weight decay.
        hessian_power: k in (√v̂)^k, in [0, 1]; 1 is AdaHessian, 0 is Adam-like momentum SGD.
        hessian_interval: estimate the Hessian on steps 1, 1+N, 1+2N, …; in between the
            last v is reused and no double backward is needed.
        n_samples: Rademacher probes per Hessian estimate.
        block_size: average |D| over contiguous blocks of this size along the last
            dimension of tensors with two or more dims (32 in the transformer recipe).
        average_conv_kernel: average |D| of 4-D conv kernels over their spatial dims.
        seed: seed of the probe generator (its own ``torch.Generator``; the global RNG is
            never touched). ``None`` takes ``torch.initial_seed()``.
        foreach: use the ``torch._foreach_*`` kernels; ``None`` picks as torch.optim does.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        hessian_interval: int = 1,
        n_samples: int = 1,
        block_size: int = 1,
        average_conv_kernel: bool = True,
        seed: int | None = None,
        foreach: bool | None = None,
    ):
        _validate_group_hyperparameters(lr, betas, eps, weight_decay, hessian_power, block_size)
        _check_int("hessian_interval", hessian_interval)
        _check_int("n_samples", n_samples)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            block_size=block_size, average_conv_kernel=average_conv_kernel, foreach=foreach,
        )
        super().__init__(params, defaults)
        self.hessian_interval = hessian_interval
        self.n_samples = n_samples
        self.probes = ProbeGenerator(torch.initial_seed() if seed is None else seed)
        # Counters that belong to the optimizer as a whole, saved with its state.
        self.counters = {"step": 0, "hessian_updates": 0, "skipped_hessian_updates": 0}
        self.last_hessian_mean = float("nan")
        # Signed sums of z ⊙ Hz over the micro-batches of the step being built.
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        self._probe_snapshot: dict | None = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                         group["hessian_power"], group["block_size"])

    # ------------------------------------------------------------------ Hessian input
    def is_hessian_step(self) -> bool:
        """Whether the next ``step()`` updates the Hessian moving average."""
        return self.counters["step"] % self.hessian_interval == 0

    def trainable_params(self) -> list[torch.Tensor]:
        """The parameters AdaHessian estimates and updates, in group order (the order of ``grads``)."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def begin_hessian_accumulation(self) -> None:
        """Start the estimate of a new step: drop partial sums, pin this step's probes.

        Every micro-batch of a step uses the same probes z, so that accumulating k
        micro-batches estimates z ⊙ (Σ H_i) z exactly as one large batch would.
        """
        self._pending.clear()
        self._probe_snapshot = self.probes.state_dict()

    def accumulate_hessian(
        self,
        loss: torch.Tensor | None = None,
        *,
        grads: Iterable[torch.Tensor | None] | None = None,
        scale: float = 1.0,
        add_grad: bool = True,
    ) -> None:
        """Add one micro-batch's z ⊙ Hz / ``scale`` to the step's estimate and its gradient to ``.grad``.

        Pass the micro-batch loss exactly as it would go to ``backward()`` (already
        divided for gradient accumulation, already multiplied by an AMP loss scale),
        or ``grads`` made with ``create_graph=True`` for the trainable parameters in
        group order.  ``scale`` is the AMP loss scale: the Hessian estimate is stored
        unscaled, while ``.grad`` stays scaled for the GradScaler to unscale.  The
        double-backward graph is released before this returns.  ``add_grad=False``
        estimates the Hessian only, when ``.grad`` comes from another backward.
        """
        params = self.trainable_params()
        if grads is None:
            if loss is None:
                raise ValueError("accumulate_hessian needs either loss or grads.")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"accumulate_hessian got {len(grads)} grads for {len(params)} trainable parameters.")
        if self._probe_snapshot is None:
            self.begin_hessian_accumulation()
        else:
            self.probes.load_state_dict(self._probe_snapshot)
        estimates = hutchinson_diagonal(grads, params, self.probes, self.n_samples, scale)
        with torch.no_grad():
            for p, g, d in zip(params, grads, estimates):
                acc = self._pending.get(p)
                self._pending[p] = d if acc is None else acc.add_(d)
                if g is None or not add_grad:
                    continue
                g = g.detach()
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)

    def pending_hessian(self) -> list[torch.Tensor]:
        """The partial estimates of this step, for an all-reduce across processes."""
        return list(self._pending.values())

    def _estimate_from_grad_graph(self) -> None:
        params = self.trainable_params()
        # Parameters without a grad still draw their probes, as in accumulate_hessian,
        # so that both ways in see the same probe stream.
        grads = [p.grad for p in params]
        if not any(g is not None and g.requires_grad for g in grads):
            raise RuntimeError(NO_GRAPH_MESSAGE.format(interval=self.hessian_interval,
                                                       step=self.counters["step"] + 1))
        self.begin_hessian_accumulation()
        with torch.enable_grad():
            estimates = hutchinson_diagonal(grads, params, self.probes, self.n_samples)
        self._pending.update((p, d) for p, d, g in zip(params, estimates, grads) if g is not None)

    def _take_hessian(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """|D|, block-averaged per group, or None when the estimate is not finite."""
        pending, self._pending, self._probe_snapshot = self._pending, {}, None
        diag: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in pending:
                    diag[p] = block_average_(pending[p].abs_(), group["block_size"], group["average_conv_kernel"])
        if not diag:
            return {}
        ds = list(diag.values())
        total = torch.stack([d.sum() for d in ds]).sum().item()
        if not math.isfinite(total):
            self.counters["skipped_hessian_updates"] += 1
            return None
        self.last_hessian_mean = total / sum(d.numel() for d in ds)
        self.counters["hessian_updates"] += 1
        return diag

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        hessian_step = self.is_hessian_step()
        diag = None
        if hessian_step:
            if not self._pending:
                self._estimate_from_grad_graph()
            diag = self._take_hessian()
        else:
            self._pending.clear()
            self._probe_snapshot = None
        self.counters["step"] += 1

        for group in self.param_groups:
            params, grads, exp_avgs, exp_hs, ds, steps, hsteps = [], [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.requires_grad:
                    # create_graph=True leaves grad -> graph -> param -> grad: a cycle
                    # that keeps the whole graph alive unless the grad is detached.
                    p.grad = p.grad.detach()
                if p.grad.is_sparse:
                    raise RuntimeError("AdaHessian does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["hessian_step"] = 0
                    for key in _STATE_KEYS:
                        state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
                state["step"] += 1
                d = diag.get(p) if diag else None
                if d is not None:
                    state["hessian_step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_hs.append(state["exp_hessian_diag_sq"])
                ds.append(d)
                steps.append(state["step"])
                hsteps.append(state["hessian_step"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
            beta1, beta2 = group["betas"]
            adahessian(
                params, grads, exp_avgs, exp_hs, ds, steps, hsteps,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"], foreach=foreach,
            )
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["adahessian"] = {
            "counters": dict(self.counters),
            "probes": self.probes.state_dict(),
            "last_hessian_mean": self.last_hessian_mean,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("adahessian", None)
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype; the moments of a bf16
        # parameter must stay fp32, so put the saved fp32 tensors back.
        current = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, current):
            for key in _STATE_KEYS:
                if idx in saved_state and key in saved_state[idx]:
                    self.state[p][key] = saved_state[idx][key].to(device=p.device, dtype=_state_dtype(p))
        if extra is not None:
            self.counters.update(extra["counters"])
            self.probes.load_state_dict(extra["probes"])
            self.last_hessian_mean = extra.get("last_hessian_mean", float("nan"))
        self._pending.clear()
        self._probe_snapshot = None


# ---------------------------------------------------------------------- functional core
def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones: never below fp32."""
    return torch.promote_types(p.dtype, torch.float32)


def adahessian(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_hessian_diag_sqs: list[torch.Tensor],
    hessian_diags: list[torch.Tensor | None],
    steps: list[int],
    hessian_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    foreach: bool = False,
) -> None:
    """One AdaHessian update of ``params`` in place; moments are fp32.

    ``steps``/``hessian_steps`` already count this step.  ``hessian_diags[i]`` is
    |D| for a parameter whose v is updated now, ``None`` to reuse its v.  A
    parameter whose v has never been updated (its first estimate was not finite)
    only accumulates momentum: with v = 0 its step would be m/eps.
    """
    fn = _multi_tensor_adahessian if foreach else _single_tensor_adahessian
    fn(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, steps, hessian_steps,
       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)


def _denominator_(v: torch.Tensor, bias_correction2: float, hessian_power: float, eps: float) -> torch.Tensor:
    """(√(v/bc2))^k + eps, computed into ``v`` (a scratch copy)."""
    v.div_(bias_correction2)
    if hessian_power == 1.0:
        v.sqrt_()
    elif hessian_power == 0.0:
        v.fill_(1.0)
    else:
        v.pow_(hessian_power / 2)
    return v.add_(eps)


def _single_tensor_adahessian(params, grads, exp_avgs, exp_hs, ds, steps, hsteps, *,
                              lr, beta1, beta2, eps, weight_decay, hessian_power):
    for p, g, m, v, d, t, s in zip(params, grads, exp_avgs, exp_hs, ds, steps, hsteps):
        m.lerp_(g.to(m.dtype), 1 - beta1)
        if d is not None:
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        if s == 0:
            continue
        p32 = p if p.dtype == _state_dtype(p) else p.float()
        if weight_decay:
            p32.mul_(1 - lr * weight_decay)
        denom = _denominator_(v.clone(), 1 - beta2 ** s, hessian_power, eps)
        p32.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        if p32 is not p:
            p.copy_(p32)


def _multi_tensor_adahessian(params, grads, exp_avgs, exp_hs, ds, steps, hsteps, *,
                             lr, beta1, beta2, eps, weight_decay, hessian_power):
    grads32 = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads32, 1 - beta1)
    with_d = [i for i, d in enumerate(ds) if d is not None]
    if with_d:
        vs = [exp_hs[i] for i in with_d]
        dd = [ds[i] for i in with_d]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, dd, dd, value=1 - beta2)
    live = [i for i, s in enumerate(hsteps) if s > 0]
    if not live:
        return
    ps = [params[i] for i in live]
    p32s = [p if p.dtype == _state_dtype(p) else p.float() for p in ps]
    if weight_decay:
        torch._foreach_mul_(p32s, 1 - lr * weight_decay)
    denoms = torch._foreach_div([exp_hs[i] for i in live], [1 - beta2 ** hsteps[i] for i in live])
    if hessian_power == 1.0:
        torch._foreach_sqrt_(denoms)
    elif hessian_power == 0.0:
        denoms = [torch.ones_like(x) for x in denoms]
    else:
        torch._foreach_pow_(denoms, hessian_power / 2)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(p32s, [exp_avgs[i] for i in live], denoms,
                            [-lr / (1 - beta1 ** steps[i]) for i in live])
    low = [(p, p32) for p, p32 in zip(ps, p32s) if p32 is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [p32 for _, p32 in low])
