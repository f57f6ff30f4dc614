"""AdaHessian (Yao, Gholami et al., AAAI 2021): Adam with a Hessian-diagonal denominator.

    m_t = β1 m_{t-1} + (1 − β1) g_t
    v_s = β2 v_{s-1} + (1 − β2) D_s²            on Hessian steps only (s counts them)
    p  ← p − lr·wd·p                            decoupled weight decay
    p  ← p − lr · m̂_t / ((√v̂_s)^k + eps)        m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^s)

D is Hutchinson's |z ⊙ Hz| averaged over blocks (``estimate.py``).  As in
``torch/optim/adamw.py``, the class gathers each group's lists and lazily makes
state (``_init_group``), then a functional core (``adahessian``) with a for-loop
and a ``foreach`` implementation does the arithmetic; on CPU the steps without an
estimate take torch's fused AdamW kernel with v held (``fused_step.py``).

Curvature is per coordinate: v and its bias correction advance only for the rows
(slices along the first dimension) that an estimate observed.  An embedding row no
token of the Hessian batch used keeps its v; a row no estimate has seen yet is
divided by the tensor's mean v̂ over the rows that were seen, never by eps alone.
Where every row is seen on every Hessian step (dense layers, or a batch that covers
every row) this is exactly the rule above.

Three ways to feed it the Hessian:

* standalone, as the earlier AdaHessian packages: ``loss.backward(create_graph=True)``
  then ``step()``, which takes Hz from the gradients' graph and frees it;
* micro-batch by micro-batch: ``est = opt.estimate()``, ``est.accumulate(loss_i)`` for
  each, ``est.all_reduce_()`` under data parallelism, then ``step()``;
* with ``hessian_estimator="finite_difference"``, ``step(closure)``: the closure runs at
  θ and again at θ + εz (no double backward).  ``AdaHessianTrainer`` does all this itself.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Iterable, Literal, NamedTuple

import torch
from torch.optim.optimizer import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .estimate import HessianEstimate, hessian_diagonal_
from .estimators import FD_STEP, closure_difference
from .fused_step import fusable, fused_kernel_holds_v, fused_plain_update_, fused_row_update_
from .probes import is_dtensor
from .validation import HyperparameterError, check_group_hyperparameters, check_optimizer_hyperparameters

__all__ = ["AdaHessian", "HessianStats", "adahessian"]

_STATE_KEYS = ("exp_avg", "exp_hessian_diag_sq")
# Per-row state, made when an estimate first sees only some of a tensor's rows (the second under stale_guard).
_ROW_KEYS = ("row_hessian_steps", "row_grad_norm_at_estimate", "row_grad_sq_at_estimates")
# State a parameter has only under some settings (stale_guard, its reference, time_weighted).
_OPTIONAL_SCALARS = ("grad_norm_avg", "grad_norm_at_estimate", "grad_sq_avg", "grad_sq_at_estimates",
                     "hessian_weight")



class _ClipNorm(NamedTuple):
    """A gradient norm told as a tensor and the bound it was clipped to: the clip factor, until it is needed."""

    norm: torch.Tensor
    max_norm: float

    def factor(self) -> torch.Tensor:
        # In float64, as Python's arithmetic on float(norm) would be, so the factor is the same.
        norm = self.norm.to(_host_scalar_dtype(self.norm.device))
        return torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)


class _MeasuredNorms(NamedTuple):
    """Each gradient's norm as the clipping measured it, before it clipped.

    The step reads every gradient's norm (is it finite; the stale guard's growth), a pass over all the
    gradients that clipping has just made: a parameter's norm here stands for its gradient's after clipping
    (times the clip factor) while the gradient is still the tensor that was measured.
    """

    # id(parameter) -> (a weak reference to its gradient when measured, its position in norms): weak, so that a
    # step the loss scaler skips leaves no gradient alive through the next backward.
    measured: dict
    norms: list

    def after_clipping(self, params: list, grads: list, factor: float | torch.Tensor) -> torch.Tensor | None:
        """The norms of ``grads`` (of ``params``) times ``factor``, one vector, or None unless each is a gradient
        measured."""
        if not self.norms:
            return None
        positions = []
        for p, g in zip(params, grads):
            entry = self.measured.get(id(p))
            if entry is None or entry[0]() is not g:
                return None
            positions.append(entry[1])
        device = self.norms[0].device
        norms = torch.stack([n.to(device, torch.float32) for n in self.norms])
        if positions != list(range(len(self.norms))):
            norms = norms[torch.tensor(positions, device=device)]
        return norms * factor if isinstance(factor, torch.Tensor) or factor != 1.0 else norms


class _RowCounts(NamedTuple):
    """A row-counted tensor's estimates per row, and v's bias correction 1 − β2^count for each."""

    steps: torch.Tensor
    correction: torch.Tensor


NO_GRAPH_MESSAGE = (
    "AdaHessian needs a Hessian-vector product on this step (hessian_interval={interval}, "
    "optimizer step {step}), but no parameter's gradient carries a graph. Call "
    "loss.backward(create_graph=True) before optimizer.step(), feed optimizer.estimate().accumulate(loss) "
    "for each micro-batch, pass a closure with hessian_estimator=\"finite_difference\", or train with "
    "hf_adahessian.AdaHessianTrainer, which does this for you."
)

# Under an AMP loss scale the second backward of the exact estimator runs at a scale of
# its own, which backs off when an estimate overflows and grows back after a run of
# finite ones, as torch's GradScaler does for the gradient: at the GradScaler's default
# 2^16 the Hessian-vector product of a BERT overflows fp16 where no gradient does.
HESSIAN_SCALE_INIT = 2.0**10
HESSIAN_SCALE_BACKOFF = 0.5
HESSIAN_SCALE_GROWTH_INTERVAL = 200


@dataclasses.dataclass
class HessianStats:
    """What the optimizer has done, saved with its state and logged by the Trainer."""

    step: int = 0
    hessian_updates: int = 0
    skipped_hessian_updates: int = 0
    skipped_steps: int = 0
    last_hessian_mean: float = float("nan")

    def counters(self) -> dict[str, int]:
        return {"step": self.step, "hessian_updates": self.hessian_updates,
                "skipped_hessian_updates": self.skipped_hessian_updates, "skipped_steps": self.skipped_steps}


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
            last v is reused and no Hessian pass is needed.
        hessian_warmup: estimate the Hessian on each of the first W steps, then every
            ``hessian_interval`` (W+1, W+1+N, …): curvature changes fastest early, above all
            while a new head is still random.
        hessian_warmup_interval: during those W steps, a Hessian every this many (steps 1,
            1+M, 1+2M, … below W; 1, the default, is every one): the warm-up's estimates
            spread over the same steps at a fraction of their cost.
        stale_guard: multiply each tensor's denominator by how much the (moving average of
            the) norm of its gradient has grown since its last estimate, never by less than 1,
            so that a stale, too small curvature does not drive steps the fresh one would not;
            per row where an estimate sees only some rows (embeddings: since the row's own last
            estimate). Inert where every row is estimated on every step.
        stale_guard_reference: what the stale guard compares the gradient's scale with.
            ``"last"``: the (β1-averaged) norm at the last estimate.  ``"average"``: the factor
            is √(ā_steps / ā_estimates), ā the bias-corrected β2 average of ‖g‖² over every step
            and over the Hessian steps, weighted as v is: with D growing as the gradient does, it
            puts v̂ where a Hessian on every step would have it, and a new estimate, which
            moves v̂ by only its share, does not undo what the guard added before it.
            Per row where rows are counted apart.  Needs ``stale_guard``.
        min_row_estimates: where an estimate sees only some rows (embeddings), a row whose v̂
            rests on fewer estimates than this takes at least the mean v̂ of the rows estimated,
            as a row never estimated takes it (one Hz of a rare token's row is a noisy reading).
            1, the default, floors only the rows never estimated (whose v is 0).  Measured on
            fine-tuning it over-damps (BENCHMARKS.md): the mean is the frequent tokens' curvature,
            and the rows estimated once are where fine-tuning learns.  Under ``time_weighted`` a
            row's count is the steps its estimates stand for.
        update_clip: bound each coordinate's m̂/denominator to [−c, c] (as Sophia does), so a
            step moves no coordinate by more than lr·c; None: unbounded (the paper's).
        time_weighted: weight each estimate in v by the steps it stands for (1 in the warm-up,
            ``hessian_interval`` after): the estimate enters v as if repeated on each of those
            steps (decay β2^w, weight 1 − β2^w, bias correction 1 − β2^(Σw)), so v̂ averages
            over steps as interval 1 does, not over estimates, and the warm-up's estimates,
            taken while the head was random, do not outweigh the later ones.  The paper's rule
            wherever every step has an estimate.
        clip_hessian: a Hessian step's estimate enters v multiplied by the factor its gradient
            was clipped by (``gradient_clipped``; the Trainer tells it ``--max_grad_norm``'s).
            Clipping the gradient by c is then taking the step of c·loss, whose curvature is
            c·H: m̂/√v̂ is unchanged by a steady clip, as Adam's m/√v is, and clipping bounds only
            the steps that stand out.  Without it (the default) clipping shrinks m̂ and not v̂,
            a lower learning rate wherever the gradient's norm stays above the bound.
        n_samples: Rademacher probes per Hessian estimate.
        block_size: average |D| over contiguous blocks of this size along the last
            dimension of tensors with two or more dims (32 in the transformer recipe).
        average_conv_kernel: average |D| of 4-D conv kernels over their spatial dims.
        hessian_estimator: ``"exact"`` (the paper's double backward) or
            ``"finite_difference"`` (two ordinary gradient passes; see ``estimators.py``).
        fd_scheme: ``"forward"`` differences (one extra gradient pass) or ``"central"``
            (two; more accurate where the forward runs in bf16).
        fd_step: the finite-difference perturbation ε·z as a share of ‖θ‖; None picks
            it by scheme and compute dtype (``estimators.FD_STEP``: 1e-3 for fp32 forward).
        seed: seed of the probes, which are drawn from (seed, step, parameter) and never
            from the global RNG. ``None`` takes ``torch.initial_seed()``.
        foreach: use the ``torch._foreach_*`` kernels; ``None`` picks them on GPUs.
        fused: take the steps without a fresh estimate through torch's fused AdamW kernel, where
            a tensor is fp32 on CPU (``fused_step.py``: the loop's step to fp32 rounding, in one pass
            where the loop makes five); ``None`` does so where this torch's kernel passes the check
            made once a process, ``True`` also, and raises where it fails; ``False`` never.
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
        hessian_warmup: int = 0,
        hessian_warmup_interval: int = 1,
        stale_guard: bool = False,
        stale_guard_reference: Literal["last", "average"] = "last",
        min_row_estimates: int = 1,
        update_clip: float | None = None,
        time_weighted: bool = False,
        clip_hessian: bool = False,
        n_samples: int = 1,
        block_size: int = 1,
        average_conv_kernel: bool = True,
        hessian_estimator: Literal["exact", "finite_difference"] = "exact",
        fd_scheme: Literal["forward", "central"] = "forward",
        fd_step: float | None = None,
        seed: int | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        try:
            check_group_hyperparameters(lr, betas, eps, weight_decay, hessian_power, block_size)
            check_optimizer_hyperparameters(hessian_interval, n_samples, hessian_estimator, fd_scheme, fd_step,
                                            hessian_warmup, update_clip, min_row_estimates, stale_guard,
                                            stale_guard_reference, hessian_warmup_interval)
        except HyperparameterError as err:
            raise ValueError(f"AdaHessian: {err}") from None
        if fused and not fused_kernel_holds_v():
            raise ValueError(f"AdaHessian: fused=True, but torch {torch.__version__}'s fused AdamW kernel does not "
                             "take AdaHessian's step on CPU (see fused_step.py); use fused=None or fused=False.")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            block_size=block_size, average_conv_kernel=average_conv_kernel, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)
        self.hessian_interval = hessian_interval
        self.hessian_warmup = hessian_warmup
        self.hessian_warmup_interval = hessian_warmup_interval
        self.stale_guard = stale_guard
        self.stale_guard_reference = stale_guard_reference
        self.min_row_estimates = min_row_estimates
        self.update_clip = update_clip
        self.time_weighted = bool(time_weighted)
        self.clip_hessian = bool(clip_hessian)
        self._clip_factor = 1.0
        self._measured_norms: _MeasuredNorms | None = None
        self.n_samples = n_samples
        self.hessian_estimator = hessian_estimator
        self.fd_scheme = fd_scheme
        self.fd_step = fd_step
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.stats = HessianStats()
        # The second backward's own loss scale (only used under an AMP loss scale).
        self.hessian_scale = HESSIAN_SCALE_INIT
        self._finite_scaled_estimates = 0
        self._estimate: HessianEstimate | None = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                        group["hessian_power"], group["block_size"])
        except HyperparameterError as err:
            raise ValueError(f"AdaHessian: {err}") from None
        for p in group["params"]:
            if p.dtype == torch.float16:
                raise ValueError(
                    "AdaHessian: a parameter is float16. Hessian-vector products overflow fp16 weights and "
                    "every estimate would be skipped; keep the weights in fp32 and train with fp16 mixed "
                    "precision (--fp16, autocast + GradScaler), or use bfloat16."
                )

    @property
    def counters(self) -> dict[str, int]:
        return self.stats.counters()

    @property
    def last_hessian_mean(self) -> float:
        return self.stats.last_hessian_mean

    # ------------------------------------------------------------------ Hessian input
    def is_hessian_step(self) -> bool:
        """Whether the next ``step()`` updates the Hessian moving average."""
        return self._is_hessian_index(self.stats.step)

    def _is_hessian_index(self, step: int) -> bool:
        if step < self.hessian_warmup:
            return step % self.hessian_warmup_interval == 0
        return (step - self.hessian_warmup) % self.hessian_interval == 0

    def _steps_covered(self) -> int:
        """The steps an estimate made now stands for: from this step to the next Hessian step."""
        n = 1
        while not self._is_hessian_index(self.stats.step + n):
            n += 1
        return n

    def needs_catch_up(self) -> bool:
        """Whether a parameter with a gradient now has never had a curvature estimate.

        With ``hessian_interval > 1`` a head used only between Hessian steps (round-robin
        tasks, a branch taken on some batches) would otherwise never move: with no v its
        step would be m/eps, so it only accumulates momentum.  The trainer answers this
        with a Hessian-only pass on the micro-batch (once per such parameter).
        """
        return any(p.grad is not None and self.state.get(p, {}).get("hessian_step", 0) == 0
                   for p in self.trainable_params())

    def gradient_clipped(self, factor: float | torch.Tensor) -> None:
        """Say that the gradient of the step about to be taken was multiplied by ``factor`` (clipping: at most 1).

        Read by ``clip_hessian`` only, and by the next ``step()`` only.  The Trainer calls it after
        ``--max_grad_norm``'s clipping; a loop of your own calls it with what it clipped by, or
        ``gradient_clipped_by_norm`` with the norm ``clip_grad_norm_`` returned.  A tensor stays where
        it is until a Hessian step reads it in the step's one host sync: the factor of a step without
        an estimate is never needed, and reading it at once would cost a sync every step on a GPU.
        """
        self._clip_factor = factor if isinstance(factor, torch.Tensor) else float(factor)

    def gradient_clipped_by_norm(self, norm, max_norm: float, measured: tuple[list, list] | None = None) -> None:
        """``gradient_clipped`` with torch's ``clip_grad_norm_`` factor, from the norm it returned.

        A tensor norm is kept as it is: the factor is made only by a step that reads it (one with an
        estimate), not on every clipped step.  ``measured``: (parameters, their gradients' norms before
        clipping), where the clipping measured each (the Trainer's does): the next step takes them, times the
        factor, for its own pass over the gradients, while each gradient is the tensor measured."""
        self._measured_norms = None if measured is None else _MeasuredNorms(
            {id(p): (weakref.ref(p.grad), i) for i, p in enumerate(measured[0])}, list(measured[1]))
        if isinstance(norm, torch.Tensor):
            self._clip_factor = _ClipNorm(norm.detach(), float(max_norm))
        else:
            self.gradient_clipped(min(1.0, max_norm / (float(norm) + 1e-6)))

    def trainable_params(self) -> list[torch.Tensor]:
        """The parameters AdaHessian estimates and updates, in group order (the order of the probes)."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def estimate(self, key=None) -> HessianEstimate:
        """This step's estimate: made on the first call, the same object until ``step()`` or ``zero_grad()``.

        ``key`` names the optimizer step the caller is building (the Trainer passes its
        ``global_step``): a call with another key starts afresh, so a step that a loss
        scaler skipped leaves nothing behind.
        """
        est = self._estimate
        if est is None or est.key != key:
            est = self._estimate = HessianEstimate(self.trainable_params(), self.seed, self.stats.step,
                                                   self.n_samples, key=key, hessian_scale=self.hessian_scale)
        return est

    def relative_fd_step(self, compute_dtype: torch.dtype | None = None) -> float:
        """ε·‖z‖ / ‖θ‖ for finite differences: ``fd_step``, or the rule for the dtype the forward computes in
        (``compute_dtype``: the autocast dtype under mixed precision; default the parameters')."""
        if self.fd_step is not None:
            return self.fd_step
        if compute_dtype is None:
            params = self.trainable_params()
            compute_dtype = params[0].dtype if params else torch.float32
        return FD_STEP[self.fd_scheme].get(compute_dtype, FD_STEP[self.fd_scheme][torch.float32])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._estimate = None
        self._clip_factor = 1.0

    def _initialising_state(self) -> bool:
        """A step at lr 0 on zero gradients into an empty state: torch.distributed.checkpoint making the
        state it is about to load into (``_init_optim_state``, FSDP2's resume).  It needs no curvature,
        and the load that follows overwrites all it makes."""
        return (not self.state and all(float(g["lr"]) == 0.0 for g in self.param_groups)
                and all(p.grad is None or not bool(p.grad.any()) for p in self.trainable_params()))

    def _estimate_from_grad_graph(self) -> HessianEstimate:
        params = self.trainable_params()
        grads = [p.grad for p in params]
        if self.hessian_estimator != "exact" or not any(g is not None and g.requires_grad for g in grads):
            raise RuntimeError(NO_GRAPH_MESSAGE.format(interval=self.hessian_interval, step=self.stats.step + 1))
        est = self.estimate(key=("graph", self.stats.step))
        with torch.enable_grad():
            est.accumulate(grads=grads, add_grad=False)
        return est

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        hessian_step = self.is_hessian_step()
        clip_factor, self._clip_factor = self._clip_factor, 1.0
        measured, self._measured_norms = self._measured_norms, None
        loss = None
        estimate, self._estimate = self._estimate, None
        if closure is not None:
            if hessian_step and self.hessian_estimator == "finite_difference":
                # Its own estimate: the closure's zero_grad() would drop one held by the optimizer.
                estimate = HessianEstimate(self.trainable_params(), self.seed, self.stats.step, self.n_samples)
                loss = closure_difference(estimate, closure, self.relative_fd_step(), self.fd_scheme)
            else:
                with torch.enable_grad():
                    loss = closure()
                if self._estimate is not None:  # the closure fed a fresh estimate itself
                    estimate, self._estimate = self._estimate, None
        if not hessian_step and not (estimate is not None and estimate.catch_up):
            estimate = None
        elif estimate is None and self._initialising_state():
            pass
        elif estimate is None:
            estimate = self._estimate_from_grad_graph()
        else:
            estimate.finish_()

        diags = self._hessian_diagonals(estimate) if estimate is not None else {}
        if isinstance(clip_factor, _ClipNorm) and (measured is not None or (self.clip_hessian and estimate is not None)):
            clip_factor = clip_factor.factor()  # once, for whichever of the two reads it
        owners, as_measured, grads = [], [], []
        for p in self.trainable_params():
            if p.grad is None:
                continue
            owners.append(p)
            as_measured.append(p.grad)  # before detaching: the tensors the clipping measured
            if p.grad.requires_grad:
                # create_graph=True leaves grad -> graph -> param -> grad: a cycle
                # that keeps the whole graph alive unless the grad is detached.
                p.grad = p.grad.detach()
            if p.grad.is_sparse:
                raise RuntimeError("AdaHessian does not support sparse gradients (nn.Embedding(sparse=True)).")
            grads.append(p.grad)

        # One host sync per step: is the gradient finite; on Hessian steps, is the
        # estimate, which tensors did it observe only in part, and the clip factor.
        norms = measured.after_clipping(owners, as_measured, clip_factor) if measured is not None and grads else None
        if norms is None and grads:
            norms = torch.stack([_whole(n).float() for n in torch._foreach_norm(grads)])
        checks = [norms.sum()] if grads else []
        for _, rows, total in diags.values():
            checks += [_whole(total).float(), _whole(rows.logical_not().sum()).float()]
        if self.stale_guard and grads:
            checks += list(norms.unbind())
        read_clip = self.clip_hessian and estimate is not None and isinstance(clip_factor, torch.Tensor)
        if read_clip:
            checks.append(_whole(clip_factor))
        device = checks[0].device if checks else None
        dtype = _host_scalar_dtype(device) if read_clip else torch.float32
        values = torch.stack([c.to(device, dtype) for c in checks]).tolist() if checks else []
        if grads and not math.isfinite(values[0]):
            # A bad batch: nothing moves, nothing is counted as done, the next step redoes this one.
            self.stats.skipped_steps += 1
            return loss
        if read_clip:
            clip_factor = values.pop()
        elif isinstance(clip_factor, (torch.Tensor, _ClipNorm)):
            clip_factor = 1.0  # no estimate this step: the factor scales nothing
        observed = self._observed_or_skip(estimate, diags, values[1 if grads else 0:1 + 2 * len(diags)])
        grad_norms = dict(zip(grads, values[1 + 2 * len(diags):])) if self.stale_guard else {}
        v_weight = self._steps_covered() if self.time_weighted and observed else 1
        self.stats.step += 1

        for group in self.param_groups:
            lists = self._init_group(group, observed, grad_norms, v_weight)
            if not lists[0]:
                continue
            beta1, beta2 = group["betas"]
            adahessian(
                *lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                update_clip=self.update_clip, min_row_estimates=self.min_row_estimates, v_weight=v_weight,
                estimate_scale=clip_factor if self.clip_hessian else 1.0, foreach=group["foreach"],
                fused=group.get("fused"),
            )
        return loss

    def _hessian_diagonals(self, estimate: HessianEstimate) -> dict:
        """param -> (D, the rows it observed, the sum of D): |sums| block-averaged per group, in place."""
        groups = {p: g for g in self.param_groups for p in g["params"]}
        return {p: hessian_diagonal_(s, groups[p]["block_size"], groups[p]["average_conv_kernel"])
                for p, s in zip(estimate.params, estimate.sums) if s is not None}

    def _observed_or_skip(self, estimate, diags, values) -> dict:
        """param -> (|D|, rows or None for all) of what enters v, or {} when the estimate is not finite."""
        if estimate is None:
            return {}
        sums = values[0::2]
        total = sum(sums)
        scaled = estimate.loss_scale > 1.0
        if not math.isfinite(total):
            self.stats.skipped_hessian_updates += 1
            if scaled:
                self.hessian_scale *= HESSIAN_SCALE_BACKOFF
                self._finite_scaled_estimates = 0
            return {}
        if scaled:
            self._finite_scaled_estimates += 1
            if self._finite_scaled_estimates >= HESSIAN_SCALE_GROWTH_INTERVAL:
                self.hessian_scale *= 2
                self._finite_scaled_estimates = 0
        self.stats.hessian_updates += 1
        numel = sum(p.numel() for p in estimate.params)
        self.stats.last_hessian_mean = total / numel if numel else float("nan")
        observed = {}
        for p, unobserved in zip(diags, values[1::2]):
            d, rows, _ = diags[p]
            if unobserved == 0:
                observed[p] = (d, None)
            elif unobserved < rows.numel():
                observed[p] = (d, rows)
        return observed

    def _init_group(self, group: dict, observed: dict, grad_norms: dict, v_weight: int = 1) -> tuple[list, ...]:
        """The group's lists for the functional core, making state on a parameter's first step.

        ``hessian_steps`` is the exponent of v's bias correction: the count of estimates, or
        under ``time_weighted`` the steps they stand for (``hessian_weight``); rows count alike.
        """
        params, grads, exp_avgs, exp_hs, diags, rows_seen, row_counts, steps, hsteps, scales = ([] for _ in range(10))
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["hessian_step"] = 0
                for key in _STATE_KEYS:
                    state[key] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            state["step"] += 1
            d, rows = observed.get(p, (None, None))
            if d is not None:
                if rows is not None and "row_hessian_steps" not in state:
                    # The first step that saw only some rows: from now on each row counts its own.
                    state["row_hessian_steps"] = torch.full_like(
                        rows, float(estimate_count(state)), dtype=torch.float32)
                state["hessian_step"] += 1
                if self.time_weighted or "hessian_weight" in state:
                    # What v holds, in steps; resumed without time weighting, each estimate weighs 1.
                    state["hessian_weight"] = state.get("hessian_weight", state["hessian_step"] - 1) + v_weight
                if "row_hessian_steps" in state:
                    state["row_hessian_steps"].add_(float(v_weight) if rows is None
                                                    else rows.to(torch.float32) * v_weight)
            counts = state.get("row_hessian_steps")
            # Computed once: the guard's average reference and v̂ divide by the same per-row correction.
            counts = None if counts is None else _RowCounts(counts, _row_bias_correction(counts, group["betas"][1]))
            scales.append(self._stale_scale(state, grad_norms[p.grad], d is not None, rows, group, v_weight, counts)
                          if p.grad in grad_norms else 1.0)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_hs.append(state["exp_hessian_diag_sq"])
            diags.append(d)
            rows_seen.append(rows)
            row_counts.append(counts)
            steps.append(state["step"])
            hsteps.append(estimate_count(state))
        return params, grads, exp_avgs, exp_hs, diags, rows_seen, row_counts, steps, hsteps, scales

    def _stale_scale(self, state: dict, grad_norm: float, estimated: bool, rows: torch.Tensor | None,
                     group: dict, v_weight: int, counts: _RowCounts | None = None) -> float | torch.Tensor:
        """``stale_guard``: the growth of the gradient's scale since the last estimate, at least 1.

        Through a linear head, the gradient upstream grows with the head's weights and the
        curvature with their square, so √v grows as the gradient does: what the gradient
        grew by, the stale denominator is short of.  An average of norms (β1, as m) keeps
        one noisy batch from counting as growth.  Where rows are counted apart (an embedding
        whose rows an estimate sees only when their tokens are in its batch), each row's
        reference is the scale at its own last estimate, a vector of factors: a row last
        estimated while the head was random keeps its factor when a later estimate refreshes
        only the frequent rows.  Rows never estimated, which take the mean v̂ of those seen,
        follow the tensor's latest estimate.  ``stale_guard_reference="average"``:
        ``_refresh_average_references``.
        """
        beta1, beta2 = group["betas"]
        if self.stale_guard_reference == "average":
            _refresh_average_references(state, grad_norm, estimated, rows, beta2, v_weight)
            return stale_factors(state, group, "average", None if counts is None else counts.correction)
        if "grad_norm_avg" not in state:
            # The first step, or a run resumed without the guard's state: as if earlier steps had this norm.
            state["grad_norm_avg"] = (1 - beta1 ** (state["step"] - 1)) * grad_norm
        state["grad_norm_avg"] = beta1 * state["grad_norm_avg"] + (1 - beta1) * grad_norm
        current = _running_grad_scale(state, beta1)
        if "row_hessian_steps" in state:
            _refresh_row_references(state, current, estimated, rows)
        elif estimated or "grad_norm_at_estimate" not in state:
            state["grad_norm_at_estimate"] = current
        return stale_factors(state, group, "last")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["adahessian"] = {
            "stats": dataclasses.asdict(self.stats),
            "seed": self.seed,
            "hessian_scale": self.hessian_scale,
            "finite_scaled_estimates": self._finite_scaled_estimates,
        }
        # torch.distributed.checkpoint (FSDP2's checkpoints, through accelerate) keeps only "state" and
        # "param_groups": the same record rides in the first group too, where it survives.
        if sd["param_groups"]:
            sd["param_groups"][0] = {**sd["param_groups"][0], "adahessian": sd["adahessian"]}
        # It also loads only the keys that the state it loads into already has (made by a step at
        # lr 0, see _initialising_state), so every parameter's entry carries every key: the ones a
        # tensor lacks are written as absent (per-row values -1, NaN) and dropped again on load.
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, entry in sd["state"].items():
            full = dict(entry)
            for key in _ROW_KEYS:
                if key not in full:
                    full[key] = _absent_rows(params[idx])
            for key in _OPTIONAL_SCALARS:
                full.setdefault(key, math.nan)
            sd["state"][idx] = full
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        groups = state_dict.get("param_groups") or [{}]
        top = state_dict.pop("adahessian", None)
        # The group's copy first: what torch.distributed.checkpoint hands over is rebuilt from the
        # state dict of the optimizer it loads into, with the saved values put into its groups.
        extra = groups[0].get("adahessian", top)
        saved_state = {idx: _present(entry) for idx, entry in state_dict["state"].items()}
        state_dict["state"] = saved_state
        if extra is None and any("exp_avg_sq" in s for s in saved_state.values()):
            raise ValueError(
                "AdaHessian cannot resume this optimizer state: it was saved by an Adam-type optimizer "
                "(it has exp_avg_sq and no Hessian state). Resume with the optimizer that saved it, or start "
                "AdaHessian from the model weights alone (a new output folder, or --ignore_data_skip with "
                "resume_from_checkpoint=None)."
            )
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.pop("adahessian", None)
        # torch casts loaded state to each parameter's dtype; the moments of a bf16
        # parameter must stay fp32, so put the saved fp32 tensors back.
        current = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, current):
            for key in (*_STATE_KEYS, *_ROW_KEYS):
                if idx in saved_state and key in saved_state[idx]:
                    dtype = torch.float32 if key in _ROW_KEYS else _state_dtype(p)
                    self.state[p][key] = saved_state[idx][key].to(device=p.device, dtype=dtype)
        if extra is not None:
            if "stats" in extra:
                self.stats = HessianStats(**extra["stats"])
            else:  # saved by 0.1: counters and a generator state
                self.stats = HessianStats(**extra["counters"],
                                          last_hessian_mean=extra.get("last_hessian_mean", float("nan")))
            self.seed = int(extra.get("seed", extra.get("probes", {}).get("seed", self.seed)))
            self.hessian_scale = float(extra.get("hessian_scale", HESSIAN_SCALE_INIT))
            self._finite_scaled_estimates = int(extra.get("finite_scaled_estimates", 0))
        self._estimate = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_estimate", None)
        self.__dict__.setdefault("_measured_norms", None)


def estimate_count(state: dict) -> float:
    """What a parameter's v̂ rests on, its bias correction's exponent: the count of estimates, or under
    ``time_weighted`` the steps they stand for."""
    return state.get("hessian_weight", state["hessian_step"])


def _running_grad_scale(state: dict, beta1: float) -> float:
    """The bias-corrected running average of a parameter's gradient norm (``stale_guard``)."""
    return state["grad_norm_avg"] / (1 - beta1 ** state["step"])


def _refresh_row_references(state: dict, current: float, estimated: bool, rows: torch.Tensor | None) -> None:
    """Each row's reference scale: the running gradient scale at the row's own last estimate."""
    row_steps = state["row_hessian_steps"]
    reference = state.get("row_grad_norm_at_estimate")
    if reference is None:  # rows are counted apart from now on; until now every estimate saw them all
        reference = state["row_grad_norm_at_estimate"] = torch.full_like(
            row_steps, state.get("grad_norm_at_estimate", current))
    if estimated and rows is None:
        reference.fill_(current)
    elif estimated:
        # Rows never seen take the mean v̂ of the rows seen, which this estimate refreshed.
        reference.masked_fill_(rows | (row_steps == 0), current)


def _refresh_average_references(state: dict, grad_norm: float, estimated: bool, rows: torch.Tensor | None,
                                beta2: float, v_weight: int) -> None:
    """``stale_guard_reference="average"``: ‖g‖² averaged over every step, and over the Hessian steps as v
    averages D² there (decay β2^w; per row where rows are counted apart).

    ``state`` already counts this step and its estimate."""
    square = grad_norm * grad_norm
    # No history: the first step, or a run resumed from a state without these averages (another
    # reference).  As if every earlier step had this norm: no growth, a factor of 1 to start from.
    fresh = "grad_sq_avg" not in state
    if fresh:
        earlier_estimates = estimate_count(state) - (v_weight if estimated else 0)
        state["grad_sq_avg"] = (1 - beta2 ** (state["step"] - 1)) * square
        state["grad_sq_at_estimates"] = (1 - beta2**earlier_estimates) * square
    state["grad_sq_avg"] = beta2 * state["grad_sq_avg"] + (1 - beta2) * square
    before = state["grad_sq_at_estimates"]
    decay = beta2**v_weight
    if estimated:
        state["grad_sq_at_estimates"] = decay * before + (1 - decay) * square
    if "row_hessian_steps" not in state:
        return
    row_avg = state.get("row_grad_sq_at_estimates")
    if row_avg is None:
        row_avg = state["row_grad_sq_at_estimates"] = _first_row_averages(
            state["row_hessian_steps"], estimated, rows, v_weight, beta2, square if fresh else None, before)
    if not estimated:
        return
    if rows is None:
        row_avg.mul_(decay).add_((1 - decay) * square)
    else:
        row_avg.copy_(torch.where(rows, decay * row_avg + (1 - decay) * square, row_avg))


def _first_row_averages(counts: torch.Tensor, estimated: bool, rows: torch.Tensor | None, v_weight: int,
                        beta2: float, square: float | None, tensor_average: float) -> torch.Tensor:
    """Each row's ‖g‖² average at its estimates before this step's, when rows start to be counted apart.

    Where the averages have history (``square`` None), this is the first estimate to see only some rows:
    until now every estimate saw them all, so each row's average is the tensor's.  Without history (a
    resume), each row is as if its earlier estimates had this step's norm, as often as it was estimated."""
    if square is None:
        return torch.full_like(counts, tensor_average)
    if estimated:
        counts = counts - (v_weight if rows is None else rows.to(counts.dtype) * v_weight)
    return (1 - torch.full_like(counts, beta2).pow_(counts)) * square


def _row_bias_correction(counts: torch.Tensor, beta2: float) -> torch.Tensor:
    """1 − β2^count per row; 1 for rows never estimated, whose averages are still 0."""
    return torch.where(counts > 0, 1 - torch.full_like(counts, beta2).pow_(counts), 1.0)


def _average_stale_factors(state: dict, beta2: float,
                           row_correction: torch.Tensor | None = None) -> float | torch.Tensor:
    """√(ā_steps / ā_estimates), at least 1 (``stale_guard_reference="average"``)."""
    count = estimate_count(state)
    if count == 0 or state.get("grad_sq_at_estimates", 0.0) <= 0:
        return 1.0
    # Both sides written alike, so that where every step is a Hessian step the factor is exactly 1.
    current = math.sqrt(state["grad_sq_avg"] / (1 - beta2 ** state["step"]))
    reference = math.sqrt(state["grad_sq_at_estimates"] / (1 - beta2**count))
    row_avg = state.get("row_grad_sq_at_estimates")
    if row_avg is None:
        return max(1.0, current / reference)
    counts = state["row_hessian_steps"]
    if row_correction is None:
        row_correction = _row_bias_correction(counts, beta2)
    # Rows never estimated take the mean v̂ of the rows seen: the tensor's reference.
    row_reference = torch.where(counts > 0, row_avg.div(row_correction).sqrt_(), reference)
    return torch.where(row_reference > 0, current / row_reference, 1.0).clamp_(min=1.0)


def stale_factors(state: dict, group: dict, reference: str = "last",
                  row_correction: torch.Tensor | None = None) -> float | torch.Tensor:
    """The stale guard's factor on a parameter's denominator, from its state and its group's betas and
    power: the running gradient scale now over the one at the last estimate (``reference="last"``) or the
    averages' ratio (``"average"``), at least 1; one per row where rows are counted apart (``row_correction``:
    the rows' bias correction of v, where the caller has it already)."""
    (beta1, beta2), hessian_power = group["betas"], group["hessian_power"]
    if reference == "average":
        factors = _average_stale_factors(state, beta2, row_correction)
        if isinstance(factors, float):
            return factors**hessian_power
        return factors if hessian_power == 1.0 else factors.pow_(hessian_power)
    current = _running_grad_scale(state, beta1)
    if "row_grad_norm_at_estimate" in state:
        reference = state["row_grad_norm_at_estimate"]
        factors = torch.where(reference > 0, current / reference, 1.0).clamp_(min=1.0)
        return factors if hessian_power == 1.0 else factors.pow_(hessian_power)
    reference = state["grad_norm_at_estimate"]
    return max(1.0, current / reference) ** hessian_power if reference > 0 else 1.0


def _absent_rows(p: torch.Tensor) -> torch.Tensor:
    """-1 per row of ``p`` ("no per-row state"), sharded as ``p`` is."""
    local = p.to_local() if is_dtensor(p) else p
    rows = torch.full(p.shape[:1], -1.0, device=local.device)
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(rows, p.device_mesh, p.placements, src_data_rank=None)
    return rows


def _present(entry: dict) -> dict:
    """A saved parameter's state without the keys written as absent (see ``state_dict``)."""
    entry = dict(entry)
    for key in _ROW_KEYS:
        rows = entry.get(key)
        if isinstance(rows, torch.Tensor) and bool(_whole((rows < 0).all())):
            del entry[key]
    for key in _OPTIONAL_SCALARS:
        if isinstance(entry.get(key), float) and math.isnan(entry[key]):
            del entry[key]
    return entry


def _host_scalar_dtype(device: torch.device | None) -> torch.dtype:
    """float64, Python's float, for a scalar read on the host; MPS has no float64."""
    return torch.float32 if device is not None and device.type == "mps" else torch.float64


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A reduction of a sharded (FSDP2) tensor completed across the shards; anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


# ---------------------------------------------------------------------- functional core
def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones: never below fp32."""
    return torch.promote_types(p.dtype, torch.float32)


def _default_foreach(params: list[torch.Tensor]) -> bool:
    """The foreach kernels where torch.optim defaults to them: every tensor on a GPU-like device."""
    return bool(params) and all(p.device.type in ("cuda", "xpu") and type(p) in (torch.Tensor, torch.nn.Parameter)
                                for p in params)


def adahessian(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_hessian_diag_sqs: list[torch.Tensor],
    hessian_diags: list[torch.Tensor | None],
    observed_rows: list[torch.Tensor | None],
    row_hessian_steps: list[torch.Tensor | None],
    steps: list[int],
    hessian_steps: list[int],
    denominator_scales: list[float | torch.Tensor] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    update_clip: float | None = None,
    min_row_estimates: int = 1,
    v_weight: int = 1,
    estimate_scale: float = 1.0,
    foreach: bool | None = None,
    fused: bool | None = False,
) -> None:
    """One AdaHessian update of ``params`` in place; moments are fp32.

    ``steps``/``hessian_steps`` already count this step.  ``hessian_diags[i]`` is
    |D| for a parameter whose v is updated now (its shape, or a broadcast of block means
    shaped ``(*leading, blocks, block_size)``: ``estimate.hessian_diagonal_``), ``None`` to
    reuse its v;
    ``observed_rows[i]`` is None when D covers every row, else which rows it saw
    (v moves only there).  ``row_hessian_steps[i]`` is None while every row has
    been seen on each of the tensor's Hessian steps, else each row's count (the
    optimizer passes it with its bias correction, computed once a step).  A
    parameter whose v has never been updated only accumulates momentum: with
    v = 0 its step would be m/eps.  ``denominator_scales[i]`` multiplies parameter i's
    (√v̂)^k (the stale guard; 1 by default; one factor per row where rows are counted
    apart); ``update_clip`` bounds m̂/denominator.  A row counted apart with fewer than
    ``min_row_estimates`` estimates takes at least the mean v̂ of the rows estimated.
    ``v_weight`` w: the steps this step's estimates stand for; v decays by β2^w and takes
    1 − β2^w of D² (``time_weighted``; 1 is the paper's EMA).  ``estimate_scale`` c: D enters v as c·D
    (``clip_hessian``: the gradient's clip factor).  ``fused`` (``None`` or True): a tensor without an
    estimate this step takes torch's fused AdamW kernel where it can (``fused_step.py``; a denominator that
    varies by row, a slice of rows at a time); False: never.
    """
    if foreach is None:
        foreach = _default_foreach(params)
    if denominator_scales is None:
        denominator_scales = [1.0] * len(params)
    row_counts = [c if c is None or isinstance(c, _RowCounts) else _RowCounts(c, _row_bias_correction(c, beta2))
                  for c in row_hessian_steps]
    if fused is not False and hessian_power == 1.0 and update_clip is None and fused_kernel_holds_v():
        lists = (params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, observed_rows, row_counts, steps,
                 hessian_steps, denominator_scales)
        # Every tensor without an estimate this step: one denominator for the whole tensor takes the kernel in
        # one call per (t, c); a denominator that varies by row (rows counted apart, a stale guard per row), a
        # slice of rows at a time, each slice's denominator made into the v the kernel reads.
        between = [i for i in range(len(params)) if hessian_diags[i] is None and hessian_steps[i] > 0
                   and fusable(params[i], exp_avgs[i], exp_hessian_diag_sqs[i])]
        plain, rowwise = [], []
        for i in between:
            tensor_wide = row_counts[i] is None and not isinstance(denominator_scales[i], torch.Tensor)
            (plain if tensor_wide else rowwise).append(i)
        if plain:
            fused_plain_update_(
                *_subsets((params, grads, exp_avgs, exp_hessian_diag_sqs, steps), plain),
                [_tensor_factor(hessian_steps[i], beta2, 1.0, denominator_scales[i]) for i in plain],
                lr=lr, beta1=beta1, eps=eps, weight_decay=weight_decay)
        for i in rowwise:
            fused_row_update_(params[i], grads[i], exp_avgs[i], steps[i],
                              _squared_denominators(exp_hessian_diag_sqs[i], hessian_steps[i], row_counts[i], beta2,
                                                    denominator_scales[i], min_row_estimates),
                              lr=lr, beta1=beta1, eps=eps, weight_decay=weight_decay)
        if between:
            (params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, observed_rows, row_counts, steps,
             hessian_steps, denominator_scales) = _subsets(lists, _others(len(params), between))
    fn = _multi_tensor_adahessian if foreach else _single_tensor_adahessian
    fn(params, grads, exp_avgs, exp_hessian_diag_sqs, hessian_diags, observed_rows, row_counts, steps,
       hessian_steps, denominator_scales, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
       hessian_power=hessian_power, update_clip=update_clip, min_row_estimates=min_row_estimates,
       beta2_now=beta2 if v_weight == 1 else beta2**v_weight, d_scale=estimate_scale)


def _subsets(lists, indices: list[int]) -> list[list]:
    """Each of the parallel ``lists`` restricted to ``indices``, in order."""
    return [[xs[i] for i in indices] for xs in lists]


def _others(n: int, indices: list[int]) -> list[int]:
    """The indices below ``n`` not in ``indices``, in order."""
    taken = set(indices)
    return [i for i in range(n) if i not in taken]


def _power_(v: torch.Tensor, hessian_power: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(√v)^k, into ``out`` (v itself for in place; a new tensor when None)."""
    if hessian_power == 1.0:
        return torch.sqrt(v, out=out)
    if hessian_power == 0.0:
        return (torch.empty_like(v) if out is None else out).fill_(1.0)
    return torch.pow(v, hessian_power / 2, out=out)


def _tensor_factor(s: float, beta2: float, hessian_power: float, scale: float) -> float:
    """c with c·(√v)^k = scale·(√v̂)^k, v̂ = v/(1 − β2^s): one number for a tensor whose rows share a count.

    The denominator is then c·((√v)^k + eps/c), and 1/c joins the step size: two passes over v
    (the power, eps/c) where bias-correcting, powering, scaling and adding eps took four.
    """
    return scale * (1 - beta2**s) ** (-hessian_power / 2)


def _row_view(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.view(rows.shape + (1,) * (like.dim() - rows.dim()))


def _v_as(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """v viewed in D's shape: D may be a broadcast of block means, (*leading, blocks, block_size)."""
    return v if d.shape == v.shape else v.view(d.shape)


def _update_v_(v: torch.Tensor, d: torch.Tensor, rows: torch.Tensor | None, beta2: float,
               d_scale: float = 1.0) -> None:
    """v ← β2·v + (1 − β2)·(cD)², on the observed rows only (``beta2`` here: this step's decay, β2^w)."""
    v = _v_as(v, d)
    if rows is None:
        v.mul_(beta2).addcmul_(d, d, value=(1 - beta2) * d_scale**2)
    else:
        # D is exactly zero on the rows it did not observe: only the decay needs a mask.
        v.mul_(torch.where(_row_view(rows, v), beta2, 1.0)).addcmul_(d, d, value=(1 - beta2) * d_scale**2)


# A tensor of more than this many elements takes its denominator in slices of whole rows of about this
# many (1 MiB of fp32), in one reused buffer.  A parameter-sized temporary of an embedding's size is a
# fresh mapping (glibc maps every allocation above 32 MiB), and on MiniLM the word embedding's 47 MB
# denominator set the process's peak RSS on a Hessian step, where the estimate and the gradient are alive.
DENOMINATOR_SLICE = 1 << 18


def _row_slices(v: torch.Tensor) -> list:
    """Indices covering v in slices of whole rows: ``[...]`` (all of it) when v is small, 0-d or sharded."""
    if v.dim() == 0 or v.numel() <= DENOMINATOR_SLICE or is_dtensor(v):
        return [...]
    rows = max(1, DENOMINATOR_SLICE // (v.numel() // v.shape[0]))
    return [slice(start, start + rows) for start in range(0, v.shape[0], rows)]


def _row_terms(v: torch.Tensor, s: int, row_counts: _RowCounts | None, beta2: float, hessian_power: float,
               scale: float | torch.Tensor, min_row_estimates: int):
    """(factors, floor) of a tensor whose rows differ: scale·(√v̂)^k is factors·(√max(v, floor))^k per row.

    factors: each row's bias correction (1 for rows never seen, whose v is 0 and whose place the floor
    takes) and its stale-guard scale, a vector (a number where neither varies by row).  floor: None, or
    per row 0 or the mean v̂ of the rows seen in v's units (times the row's correction), for rows with
    fewer than ``min_row_estimates`` estimates.
    """
    correction = None if row_counts is None else row_counts.correction
    factors = (scale * (1 - beta2**s) ** (-hessian_power / 2) if correction is None
               else correction.pow(-hessian_power / 2).mul_(scale))
    if row_counts is None or v.dim() == 0 or hessian_power == 0.0:
        return factors, None
    floored = row_counts.steps < max(min_row_estimates, 1)
    # A sharded (FSDP2) tensor's reductions are completed across the shards (_whole), so that every
    # rank takes the same branch and the same fallback.
    if not bool(_whole(floored.any())):
        return factors, None
    # max(v̂, fallback) is max(v, fallback·correction)/correction, and the floor goes in before the
    # power: a row never seen has v = 0, which the fallback replaces exactly, and the square root
    # of zeros is several times slower on CPU than of the numbers that replace them.
    return factors, torch.where(floored, correction * _seen_rows_mean(v, row_counts, beta2), 0.0)


# v's mean v̂ over the rows seen changes only when v or the counts do, on Hessian steps: each step between
# them would read all of v again (an embedding's 47 MB on MiniLM) for the same number.  Keyed by v (weakly,
# so an entry goes with its tensor) and checked against v's and the counts' version counters, which every
# in-place write advances.
_SEEN_ROWS_MEANS = WeakIdKeyDictionary()


def _seen_rows_mean(v: torch.Tensor, row_counts: _RowCounts, beta2: float) -> float:
    """The mean v̂ of the rows some estimate has seen: what a row never seen is divided by."""
    key = (v._version, row_counts.steps._version, beta2)
    memo = None if is_dtensor(v) else _SEEN_ROWS_MEANS.get(v)
    if memo is not None and memo[0] == key and memo[1]() is row_counts.steps:
        return memo[2]
    # Masks rather than indexing, so that a sharded tensor reduces across its shards; the mean is a host
    # scalar, as the coverage test already is.  A row's mean v̂ is its sum of v over its correction: one
    # read of v, no v̂ made for it.
    row_sums = v.reshape(v.shape[0], -1).sum(dim=1).div_(row_counts.correction)
    seen = row_counts.steps > 0
    row_width = v.numel() // v.shape[0]
    mean = float(_whole(torch.where(seen, row_sums, 0.0).sum())) / (float(_whole(seen.sum())) * row_width)
    if not is_dtensor(v):
        _SEEN_ROWS_MEANS[v] = (key, weakref.ref(row_counts.steps), mean)
    return mean


def _denominators(v: torch.Tensor, s: int, row_counts: _RowCounts | None, beta2: float, hessian_power: float,
                  eps: float, scale: float | torch.Tensor = 1.0, min_row_estimates: int = 1):
    """(rows, d, c) over v's row slices, with c·d = scale·(√v̂)^k + eps on those rows, v̂ bias-corrected per
    row; rows never seen take the mean v̂ of those seen, and rows with fewer than ``min_row_estimates``
    estimates at least that.

    Where the whole tensor shares one bias correction and one scale, c is ``_tensor_factor`` and the caller
    folds 1/c into its step size; where they vary by row, c is 1 and d the denominator.  Each slice's d is
    valid until the next is made (they share one buffer); the rows' work is on row-sized vectors.  Every
    element sees the same operations however v is sliced.
    """
    slices = _row_slices(v)
    scratch = None if len(slices) == 1 else torch.empty_like(v[slices[0]])

    def out_for(part):
        return None if scratch is None else scratch[: part.shape[0]]

    if row_counts is None and not _varies_by_row(scale):
        c = _tensor_factor(s, beta2, hessian_power, float(scale))
        for rows in slices:
            part = v[rows]
            yield rows, _power_(part, hessian_power, out_for(part)).add_(eps / c), c
        return

    factors, floor = _row_terms(v, s, row_counts, beta2, hessian_power, scale, min_row_estimates)
    for rows in slices:
        part = v[rows]
        if floor is None:
            d = _power_(part, hessian_power, out_for(part))
        else:
            hat = torch.maximum(part, _row_view(floor[rows], part), out=out_for(part))
            d = _power_(hat, hessian_power, out=hat)
        d.mul_(_row_view(factors[rows], d) if isinstance(factors, torch.Tensor) else factors)
        yield rows, d.add_(eps), 1.0


def _squared_denominators(v: torch.Tensor, s: int, row_counts: _RowCounts | None, beta2: float,
                          scale: float | torch.Tensor = 1.0, min_row_estimates: int = 1):
    """(rows, w) over v's row slices, with √w = scale·√v̂ on those rows, as ``_denominators`` makes it at power 1
    (floor included): the second moment that torch's fused AdamW kernel takes for v (``fused_step``)."""
    slices = _row_slices(v)
    scratch = None if len(slices) == 1 else torch.empty_like(v[slices[0]])
    factors, floor = _row_terms(v, s, row_counts, beta2, 1.0, scale, min_row_estimates)
    squares = factors * factors
    for rows in slices:
        part = v[rows]
        out = None if scratch is None else scratch[: part.shape[0]]
        if floor is not None:
            part = torch.maximum(part, _row_view(floor[rows], part), out=out)
            out = part
        yield rows, torch.mul(part, _row_view(squares[rows], part) if _varies_by_row(squares) else squares, out=out)


def _varies_by_row(scale: float | torch.Tensor) -> bool:
    return isinstance(scale, torch.Tensor) and scale.dim() > 0


def _single_tensor_adahessian(params, grads, exp_avgs, exp_hs, ds, rows_seen, row_counts, steps, hsteps, scales, *,
                              lr, beta1, beta2, eps, weight_decay, hessian_power, update_clip, min_row_estimates=1,
                              beta2_now=None, d_scale=1.0):
    beta2_now = beta2 if beta2_now is None else beta2_now
    for p, g, m, v, d, rows, counts, t, s, scale in zip(params, grads, exp_avgs, exp_hs, ds, rows_seen, row_counts,
                                                        steps, hsteps, scales):
        m.lerp_(g.to(m.dtype), 1 - beta1)
        if d is not None:
            _update_v_(v, d, rows, beta2_now, d_scale)
        if s == 0:
            continue
        p32 = p if p.dtype == _state_dtype(p) else p.float()
        if weight_decay:
            p32.mul_(1 - lr * weight_decay)
        for rows, denom, c in _denominators(v, s, counts, beta2, hessian_power, eps, scale, min_row_estimates):
            if update_clip is None:
                p32[rows].addcdiv_(m[rows], denom, value=-lr / ((1 - beta1**t) * c))
            else:
                ratio = torch.div(m[rows], denom, out=denom).mul_(1 / ((1 - beta1**t) * c))
                p32[rows].add_(ratio.clamp_(-update_clip, update_clip), alpha=-lr)
        if p32 is not p:
            p.copy_(p32)


def _multi_tensor_adahessian(params, grads, exp_avgs, exp_hs, ds, rows_seen, row_counts, steps, hsteps, scales, *,
                             lr, beta1, beta2, eps, weight_decay, hessian_power, update_clip, min_row_estimates=1,
                             beta2_now=None, d_scale=1.0):
    beta2_now = beta2 if beta2_now is None else beta2_now
    # Tensors whose rows were seen unevenly (embeddings under partial coverage) are few:
    # they take the for-loop; the rest go through the foreach kernels.
    uneven = [i for i in range(len(params)) if rows_seen[i] is not None or row_counts[i] is not None]
    if uneven:
        _single_tensor_adahessian(*_subsets((params, grads, exp_avgs, exp_hs, ds, rows_seen, row_counts,
                                             steps, hsteps, scales), uneven),
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                  hessian_power=hessian_power, update_clip=update_clip,
                                  min_row_estimates=min_row_estimates, beta2_now=beta2_now, d_scale=d_scale)
        params, grads, exp_avgs, exp_hs, ds, steps, hsteps, scales = _subsets(
            (params, grads, exp_avgs, exp_hs, ds, steps, hsteps, scales), _others(len(params), uneven))
    if not params:
        return
    grads32 = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads32, 1 - beta1)
    with_d = [i for i, d in enumerate(ds) if d is not None]
    if with_d:
        dd = [ds[i] for i in with_d]
        vs = [_v_as(exp_hs[i], d) for i, d in zip(with_d, dd)]
        torch._foreach_mul_(vs, beta2_now)
        torch._foreach_addcmul_(vs, dd, dd, value=(1 - beta2_now) * d_scale**2)
    live = [i for i, s in enumerate(hsteps) if s > 0]
    if not live:
        return
    ps = [params[i] for i in live]
    p32s = [p if p.dtype == _state_dtype(p) else p.float() for p in ps]
    if weight_decay:
        torch._foreach_mul_(p32s, 1 - lr * weight_decay)
    factors = [_tensor_factor(hsteps[i], beta2, hessian_power, scales[i]) for i in live]
    live_vs = [exp_hs[i] for i in live]
    if hessian_power == 1.0:
        denoms = torch._foreach_sqrt(live_vs)
    elif hessian_power == 0.0:
        denoms = [torch.ones_like(x) for x in live_vs]
    else:
        denoms = torch._foreach_pow(live_vs, hessian_power / 2)
    torch._foreach_add_(denoms, [eps / c for c in factors])
    step_sizes = [-lr / ((1 - beta1 ** steps[i]) * c) for i, c in zip(live, factors)]
    if update_clip is None:
        torch._foreach_addcdiv_(p32s, [exp_avgs[i] for i in live], denoms, step_sizes)
    else:
        # m̂/denominator into the denominators' scratch, bounded, then the step.
        ratios = torch._foreach_div([exp_avgs[i] for i in live], denoms)
        del denoms
        torch._foreach_mul_(ratios, [1 / ((1 - beta1 ** steps[i]) * c) for i, c in zip(live, factors)])
        torch._foreach_clamp_min_(ratios, -update_clip)
        torch._foreach_clamp_max_(ratios, update_clip)
        torch._foreach_add_(p32s, ratios, alpha=-lr)
    low = [(p, p32) for p, p32 in zip(ps, p32s) if p32 is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [p32 for _, p32 in low])
