"""``Trainer`` and ``Seq2SeqTrainer`` with AdaHessian: the optimizer hook and the Hessian step.

Only two things differ from the stock Trainer, and only with ``--optim adahessian``:

* ``get_optimizer_cls_and_kwargs`` builds :class:`AdaHessian` from the arguments
  (the Trainer's own ``create_optimizer`` makes the no-decay group);
* ``training_step``, on Hessian steps, runs the Trainer's own step (loss, gradient
  accumulation scaling, ``num_items_in_batch``) with its backward replaced by the
  optimizer's ``accumulate_hessian``, with a double-backward-capable attention
  kernel and outside DDP's hooks; other steps are the Trainer's, untouched.

Clipping, the loss scaler, the scheduler, checkpoints and logging stay the Trainer's.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from transformers import Seq2SeqTrainer, Trainer

from .arguments import is_adahessian, parse_adahessian_optim_args
from .distributed import all_reduce_mean_, world_size
from .optimizer import AdaHessian

__all__ = ["AdaHessianTrainerMixin", "AdaHessianTrainer", "AdaHessianSeq2SeqTrainer"]

# Attention implementations whose backward is built from ordinary ops, or SDPA,
# whose math kernel (forced below) has a double backward.  Others are swapped to
# "sdpa" for the Hessian forward.
_DOUBLE_BACKWARD_ATTENTION = {None, "eager", "sdpa"}


class AdaHessianTrainerMixin:
    """The AdaHessian hooks, for any ``transformers.Trainer`` subclass."""

    _hessian_step_key: int | None = None

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict[str, Any]]:
        if not is_adahessian(args):
            return Trainer.get_optimizer_cls_and_kwargs(args, model)
        settings = parse_adahessian_optim_args(args.optim_args)
        settings.pop("hessian_batch_fraction")  # the trainer's, not the optimizer's
        kwargs = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            # One seed for every process, so that all draw the same probes and the
            # averaged estimate is the one a single process would make.
            "seed": args.seed,
            **settings,
        }
        return AdaHessian, kwargs

    @functools.cached_property
    def _hessian_batch_fraction(self) -> float:
        return parse_adahessian_optim_args(self.args.optim_args)["hessian_batch_fraction"]

    @property
    def adahessian(self) -> AdaHessian | None:
        """The AdaHessian optimizer under accelerate's wrapper, or None for other optimizers."""
        optimizer = getattr(self, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        return optimizer if isinstance(optimizer, AdaHessian) else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = self.adahessian
        if optimizer is None or not optimizer.is_hessian_step():
            return super().training_step(model, inputs, num_items_in_batch)
        if self._hessian_step_key != self.state.global_step:
            # First micro-batch of this optimizer step (also after a step that the
            # loss scaler skipped: its partial estimate is dropped here).
            optimizer.begin_hessian_accumulation()
            self._hessian_step_key = self.state.global_step
        fraction = self._hessian_batch_fraction
        if fraction < 1.0:
            return self._sub_batch_hessian_step(model, inputs, num_items_in_batch, optimizer, fraction)
        with self._hessian_forward(model), self._hessian_backward(optimizer):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients and world_size() > 1:
            grads = [p.grad for p in optimizer.trainable_params() if p.grad is not None]
            all_reduce_mean_(grads + optimizer.pending_hessian())
        return loss

    def _sub_batch_hessian_step(self, model, inputs, num_items_in_batch, optimizer, fraction):
        """A Hessian-only pass on the head of the batch, then the Trainer's own step for the gradient.

        A Hessian pass (forward, backward with a graph, Hessian-vector product)
        costs about three plain steps; on a quarter of the batch it costs about
        three quarters of one, for a noisier estimate that v averages all the
        same.  The gradient stays exact, and DDP syncs it as usual.
        """
        head, share = _head_of_batch(inputs, fraction)
        # The head's loss must be normalised as the gradient's is: the Trainer
        # divides by the item count when it has one, so give it the head's share.
        head_items = None if num_items_in_batch is None else num_items_in_batch * share
        # Hessian first: its graph is gone before the full batch's gradient exists,
        # so the two never share the peak.
        with self._hessian_forward(model), self._hessian_backward(optimizer, add_grad=False):
            super().training_step(model, head, head_items)
        if self.accelerator.sync_gradients and world_size() > 1:
            all_reduce_mean_(optimizer.pending_hessian())
        return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _hessian_forward(self, model):
        """No DDP reducer (it cannot see autograd.grad) and attention with a double backward."""
        with contextlib.ExitStack() as stack:
            if isinstance(model, DistributedDataParallel):
                stack.enter_context(model.no_sync())
            inner = self.accelerator.unwrap_model(model)
            config = getattr(inner, "config", None)
            attn = getattr(config, "_attn_implementation", None)
            if attn not in _DOUBLE_BACKWARD_ATTENTION and hasattr(inner, "set_attn_implementation"):
                inner.set_attn_implementation("sdpa")
                stack.callback(inner.set_attn_implementation, attn)
            # SDPA's flash and memory-efficient kernels (on CPU too) have no double backward.
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            yield

    @contextlib.contextmanager
    def _hessian_backward(self, optimizer: AdaHessian, add_grad: bool = True):
        """Swap ``accelerator.backward`` for the Hessian accumulation, scaled as accelerate scales."""
        accelerator = self.accelerator

        def backward(loss, **kwargs):
            loss = loss / accelerator.gradient_accumulation_steps
            scale = 1.0
            scaler = accelerator.scaler
            if scaler is not None and scaler.is_enabled():
                loss = scaler.scale(loss)
                scale = float(scaler.get_scale())
            optimizer.accumulate_hessian(loss, scale=scale, add_grad=add_grad)

        accelerator.backward = backward
        try:
            yield
        finally:
            del accelerator.backward

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        optimizer = self.adahessian
        if optimizer is not None and "loss" in logs:
            logs["hessian_mean"] = optimizer.last_hessian_mean
            logs["hessian_updates"] = optimizer.counters["hessian_updates"]
            logs["skipped_hessian_updates"] = optimizer.counters["skipped_hessian_updates"]
        super().log(logs, *args, **kwargs)


def _head_of_batch(inputs: dict, fraction: float) -> tuple[dict, float]:
    """The first ceil(fraction · B) rows of every batch-shaped tensor, and their share of the items.

    Items are what the Trainer counts for ``num_items_in_batch``: label tokens
    that are not ignored (-100), or rows when there are no labels.
    """
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            "--optim_args hessian_batch_fraction needs inputs whose tensors share one batch dimension; "
            f"got leading sizes {sorted(sizes)}. Use hessian_batch_fraction=1."
        )
    batch = sizes.pop()
    keep = max(1, math.ceil(fraction * batch))
    head = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() > 0:
        total = int(labels.ne(-100).sum())
        return head, (int(labels[:keep].ne(-100).sum()) / total) if total else keep / batch
    return head, keep / batch


class AdaHessianTrainer(AdaHessianTrainerMixin, Trainer):
    """``transformers.Trainer`` in which ``--optim adahessian`` trains with AdaHessian."""


class AdaHessianSeq2SeqTrainer(AdaHessianTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` in which ``--optim adahessian`` trains with AdaHessian."""
