"""``Trainer`` and ``Seq2SeqTrainer`` with AdaHessian: the Trainer hooks, nothing else.

Only these differ from the stock Trainer, and only with ``--optim adahessian``:

* ``get_optimizer_cls_and_kwargs`` builds :class:`AdaHessian` from the arguments'
  settings (the Trainer's own ``create_optimizer`` makes the no-decay group);
* ``training_step``, on Hessian steps, hands the micro-batch to the Hessian pass
  (``hessian_pass.micro_batch``), which runs the Trainer's own step (its loss, its
  scaling for accumulation and ``num_items_in_batch``, accelerate's backward) for
  the chosen estimator (under FSDP2, with each micro-batch's gradients reduced into the
  shards; under ``hessian_chunks=auto``, in the chunks ``chunking.py`` allows); other steps
  are the Trainer's, untouched;
* ``compute_loss`` marks the loss for the Hessian pass while one is running;
* the first step checks whether the model's loss really uses ``num_items_in_batch``
  (transformers 5 assumes so for any forward with ``**kwargs``, and would otherwise
  train a head that ignores it on a loss multiplied by the accumulation steps and
  the number of processes);
* ``_clip_grad_norm`` tells the optimizer what ``--max_grad_norm`` clipped the gradient by
  (``clip_hessian`` scales the step's estimate by it) and, where it clips as torch's
  ``clip_grad_norm_`` does on one process or under DDP, each gradient's norm it measured
  (the step reads them, and would otherwise measure them again);
* ``log`` adds the Hessian statistics, and the end of training logs a summary.

Clipping, the loss scaler, the scheduler, checkpoints and logging stay the Trainer's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from . import chunking, hessian_pass
from .arguments import is_adahessian, settings_of
from .clipping import clip_grad_norm_measured_
from .optimizer import AdaHessian
from .probes import is_dtensor
from .validation import AdaHessianUsageError

__all__ = ["AdaHessianTrainerMixin", "AdaHessianTrainer", "AdaHessianSeq2SeqTrainer", "check_model",
           "check_resumable"]

logger = logging.getLogger(__name__)

# What the forward computes in under accelerate's mixed precision (finite differences pick ε by it).
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AdaHessianTrainerMixin:
    """The AdaHessian hooks, for any ``transformers.Trainer`` subclass (as its first base)."""

    _loss_normalisation_checked = False
    hessian_seconds = 0.0
    _chunks_refused: str | None = None  # under hessian_chunks=auto: why not, "" for chunked; None: not asked yet

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if is_adahessian(self.args):
            self.add_callback(HessianProgress(self.callback_handler))
        if is_adahessian(self.args) and self.model is not None:
            check_model(self.model)
            exact = settings_of(self.args).optimizer_kwargs["hessian_estimator"] == "exact"
            if exact and _has_fused_lm_head(self) and getattr(self.args, "loss_type", "nll") != "nll":
                raise AdaHessianUsageError(
                    f"--optim adahessian with TRL's loss_type={self.args.loss_type!r}: the exact estimator cannot "
                    "differentiate TRL's fused LM head twice and computes the plain NLL instead, which is another "
                    "loss. Use --optim_args hessian_estimator=finite_difference (two ordinary backwards through "
                    "TRL's own kernel), or loss_type='nll'."
                )

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            check_resumable(checkpoint, adahessian=self.adahessian is not None)
        return super()._load_optimizer_and_scheduler(checkpoint)

    @classmethod
    def get_optimizer_cls_and_kwargs(cls, args, model=None) -> tuple[Any, dict[str, Any]]:
        if not is_adahessian(args):
            return super().get_optimizer_cls_and_kwargs(args, model)
        kwargs = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            # One seed for every process, so that all draw the same probes and the
            # averaged estimate is the one a single process would make.
            "seed": args.seed,
            **settings_of(args).optimizer_kwargs,
        }
        return AdaHessian, kwargs

    @property
    def adahessian(self) -> AdaHessian | None:
        """The AdaHessian optimizer under accelerate's wrapper, or None for other optimizers."""
        optimizer = getattr(self, "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        return optimizer if isinstance(optimizer, AdaHessian) else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = self.adahessian
        if optimizer is not None and not self._loss_normalisation_checked:
            self._check_loss_normalisation(model, inputs, num_items_in_batch)
            if not self.model_accepts_loss_kwargs and self.compute_loss_func is None:
                num_items_in_batch = None
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if not optimizer.is_hessian_step():
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients and optimizer.needs_catch_up():
                start = time.perf_counter()
                hessian_pass.catch_up(
                    model=model, inputs=inputs, num_items_in_batch=num_items_in_batch,
                    estimate=optimizer.estimate(key=self.state.global_step), stock_step=super().training_step,
                    accelerator=self.accelerator, estimator=optimizer.hessian_estimator,
                    relative_fd_step=optimizer.relative_fd_step(_COMPUTE_DTYPES.get(self.accelerator.mixed_precision)),
                )
                self.hessian_seconds += time.perf_counter() - start
            return loss
        settings = settings_of(self.args)
        start = time.perf_counter()
        with hessian_pass.fsdp_gradient_sync(model, restore=self._fsdp_syncs_now()):
            loss = hessian_pass.micro_batch(
                model=model, inputs=inputs, num_items_in_batch=num_items_in_batch,
                # The first micro-batch of an optimizer step makes the estimate; a step the
                # loss scaler skipped leaves nothing behind, since global_step moved on.
                estimate=optimizer.estimate(key=self.state.global_step),
                stock_step=super().training_step, accelerator=self.accelerator,
                estimator=optimizer.hessian_estimator, fd_scheme=optimizer.fd_scheme,
                relative_fd_step=optimizer.relative_fd_step(_COMPUTE_DTYPES.get(self.accelerator.mixed_precision)),
                batch_fraction=settings.hessian_batch_fraction, chunks=self._hessian_chunks(model, inputs),
                count_items=self._count_items, last=self.accelerator.sync_gradients,
            )
        self.hessian_seconds += time.perf_counter() - start
        return loss

    def _hessian_chunks(self, model, inputs) -> int:
        """``hessian_chunks`` as given, or under ``auto`` the rule of ``chunking.py`` (why not, logged once)."""
        settings = settings_of(self.args)
        if settings.hessian_chunks is not None:
            return settings.hessian_chunks
        if self.adahessian.hessian_estimator != "exact" or settings.hessian_batch_fraction < 1.0:
            return 1  # no double-backward graph to bound, or the Hessian's is the sub-batch's already
        if self._chunks_refused is None:
            reason = chunking.why_not_chunked(self, model)
            self._chunks_refused = reason or ""
            logger.info("hessian_chunks=auto: %s", f"each micro-batch whole ({reason})" if reason else
                        f"the exact estimator's micro-batches of {chunking.AUTO_CHUNKS * chunking.MIN_ROWS_PER_CHUNK}"
                        f" rows or more in {chunking.AUTO_CHUNKS} chunks (the loss is a mean over rows or tokens)")
        return 1 if self._chunks_refused else chunking.auto_chunks(inputs)

    def _clip_grad_norm(self, model):
        optimizer = self.adahessian
        measured = None if optimizer is None else _clip_measuring(self.accelerator, model, self.args.max_grad_norm)
        if measured is None:
            norm = super()._clip_grad_norm(model)
        else:
            norm, measured = measured
        if optimizer is not None and norm is not None:
            optimizer.gradient_clipped_by_norm(norm, self.args.max_grad_norm, measured)
        return norm

    def _fsdp_syncs_now(self) -> bool:
        """Whether FSDP2 reduces this micro-batch's gradients (accelerate's no_sync turns it off before the last)."""
        return self.accelerator.sync_gradients or bool(
            self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if hessian_pass.double_backward_active() and _has_fused_lm_head(self):
            # TRL's fused LM head computes the log-probabilities in a custom autograd kernel with no
            # double backward; its default loss ("nll") is the model's own causal-LM loss, so the
            # exact estimator's forward takes that, through the model's plain forward.
            out = Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if return_outputs:
            return hessian_pass.mark(out[0]), out[1]
        return hessian_pass.mark(out)

    def _count_items(self, inputs: dict) -> float:
        """What the Trainer counts for ``num_items_in_batch``: unmasked (shifted, for causal LMs) labels, or rows."""
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if isinstance(labels, torch.Tensor) and labels.dim() > 1 and getattr(self, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
        if isinstance(labels, torch.Tensor) and labels.dim() > 0 and labels.dtype != torch.float:
            return float(labels.ne(-100).sum())
        return float(hessian_pass._batch_size(inputs))

    def _check_loss_normalisation(self, model, inputs, num_items_in_batch) -> None:
        """Does the model's loss use ``num_items_in_batch``? Two no-grad forwards, once, tell.

        transformers 5 passes the item count to any forward that takes ``**kwargs`` and
        then neither divides the loss by the accumulation steps nor lets DDP's average
        stand (it multiplies by the world size).  Most sequence-classification heads take
        ``**kwargs`` but compute a plain mean: their loss is then accumulation steps ×
        processes too large, which AdaHessian's absolute eps and the gradient clipping
        turn into a different run.  A loss that does not change when the count doubles
        does not use it, and the Trainer is told so.
        """
        self._loss_normalisation_checked = True
        if (not self.model_accepts_loss_kwargs or self.compute_loss_func is not None or num_items_in_batch is None
                or self.label_smoother is not None or getattr(self, "loss_is_scaled_for_ga", None) is not None):
            return
        prepared = self._prepare_inputs(inputs)
        losses = []
        was_training = model.training
        model.train()
        # Under the attention the Hessian forwards use (no kernel gets compiled for this alone), with
        # the RNG and BatchNorm statistics put back afterwards, so the run is the one it would have been.
        exact = self.adahessian is not None and self.adahessian.hessian_estimator == "exact"
        with torch.no_grad(), hessian_pass.untraced(model, list(model.parameters())), \
                hessian_pass.double_backward_ready(model) if exact else contextlib.nullcontext():
            state = torch.get_rng_state()
            for items in (num_items_in_batch, num_items_in_batch * 2):
                torch.set_rng_state(state)
                with self.compute_loss_context_manager():
                    out = model(**{**prepared, "num_items_in_batch": items})
                loss = out["loss"] if isinstance(out, dict) else out[0]
                losses.append(hessian_pass.plain(loss).detach().float())
        model.train(was_training)
        if torch.allclose(losses[0], losses[1], rtol=1e-4, atol=0.0):
            logger.info(
                "%s ignores num_items_in_batch: its loss is a mean already, so the Trainer divides it for "
                "gradient accumulation and lets DDP average it (transformers issue #47688).",
                type(self.accelerator.unwrap_model(model)).__name__,
            )
            self.model_accepts_loss_kwargs = False

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        optimizer = self.adahessian
        if optimizer is not None and "loss" in logs:
            stats = optimizer.stats
            logs["hessian_mean"] = stats.last_hessian_mean
            logs["hessian_updates"] = stats.hessian_updates
            logs["skipped_hessian_updates"] = stats.skipped_hessian_updates
            logs["skipped_steps"] = stats.skipped_steps
        if optimizer is not None and "train_runtime" in logs:
            stats = optimizer.stats
            logs.update(hessian_updates=stats.hessian_updates, skipped_hessian_updates=stats.skipped_hessian_updates,
                        skipped_steps=stats.skipped_steps, hessian_seconds=round(self.hessian_seconds, 2))
            logger.info(
                "AdaHessian: %d optimizer steps, %d Hessian estimates (%d skipped as not finite), %d steps skipped "
                "for a non-finite gradient; %.1f s in Hessian micro-batches (%.0f%% of training).",
                stats.step, stats.hessian_updates, stats.skipped_hessian_updates, stats.skipped_steps,
                self.hessian_seconds, 100 * self.hessian_seconds / max(logs["train_runtime"], 1e-9),
            )
        super().log(logs, *args, **kwargs)


class HessianProgress(TrainerCallback):
    """AdaHessian's statistics beside the Trainer's progress bar, updated on every step.

    The logs carry them every ``--logging_steps`` (to the console, trainer_state.json and
    ``--report_to``); the bar shows them as the run goes, whatever the logging interval.
    """

    def __init__(self, handler):
        self.handler = handler

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        bar = next((getattr(c, "training_bar", None) for c in self.handler.callbacks
                    if isinstance(c, ProgressCallback)), None)
        stats = getattr(getattr(optimizer, "optimizer", optimizer), "stats", None)
        if bar is not None and stats is not None:
            bar.set_postfix(hessian_mean=f"{stats.last_hessian_mean:.3g}", hessian_updates=stats.hessian_updates,
                            refresh=False)


def _clip_measuring(accelerator, model: torch.nn.Module, max_norm: float):
    """accelerate's ``clip_grad_norm_`` where it is torch's (one process, DDP), keeping each gradient's norm
    (``clipping.clip_grad_norm_measured_``); None where accelerate must clip: sharded or DeepSpeed training,
    XLA, SageMaker's model parallelism, DTensor or sparse gradients, a torch without ``clip_grads_with_norm_``."""
    from accelerate.utils import DistributedType
    from transformers.utils import is_sagemaker_mp_enabled

    if (accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)
            or is_sagemaker_mp_enabled() or not hasattr(torch.nn.utils, "clip_grads_with_norm_")):
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    if not params or any(is_dtensor(p.grad) or p.grad.is_sparse for p in params):
        return None
    accelerator.unscale_gradients()
    return clip_grad_norm_measured_(params, max_norm)


def _has_fused_lm_head(trainer) -> bool:
    """A TRL SFTTrainer, which patches the model with a fused LM head (trl.kernels.chunked_logprob)."""
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl.") for c in type(trainer).__mro__)


def check_model(model: torch.nn.Module) -> None:
    """What AdaHessian cannot train, said before training starts (one line each)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdaHessianUsageError(
            "--optim adahessian: the model has no trainable parameters (requires_grad is False everywhere); "
            "unfreeze some, or add adapters (PEFT) before building the trainer."
        )
    sparse = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    if sparse:
        raise AdaHessianUsageError(
            f"--optim adahessian: {sparse[0]} is nn.Embedding(sparse=True); AdaHessian needs dense gradients "
            "(a Hessian-vector product through a sparse gradient is not defined): build it with sparse=False."
        )
    if any(p.dtype == torch.float16 for p in params):
        raise AdaHessianUsageError(
            "--optim adahessian: the model's weights are float16 (model.half()); Hessian-vector products overflow "
            "fp16 weights and every estimate would be skipped. Keep the weights in fp32 and pass --fp16 (mixed "
            "precision with a loss scaler), or use --bf16 / bfloat16 weights."
        )


def check_resumable(checkpoint: str, adahessian: bool) -> None:
    """Refuse, in one line, to resume an optimizer state saved by the other kind of optimizer."""
    path = os.path.join(checkpoint, "optimizer.pt")
    if not os.path.isfile(path):
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a corrupt file: the Trainer's own load gives torch's message
        return
    saved_adahessian = isinstance(saved, dict) and "adahessian" in saved
    if saved_adahessian == adahessian:
        return
    this = "--optim adahessian" if adahessian else "an optimizer other than adahessian"
    other = "AdaHessian" if saved_adahessian else "another optimizer (no AdaHessian state)"
    raise AdaHessianUsageError(
        f"resume from {checkpoint}: its optimizer.pt was saved by {other}, and this run uses {this}. Resume with "
        "the --optim that saved it, or start afresh from its weights (--model_name_or_path "
        f"{checkpoint} with a new --output_dir, or --overwrite_output_dir)."
    )


class AdaHessianTrainer(AdaHessianTrainerMixin, Trainer):
    """``transformers.Trainer`` in which ``--optim adahessian`` trains with AdaHessian."""


class AdaHessianSeq2SeqTrainer(AdaHessianTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` in which ``--optim adahessian`` trains with AdaHessian."""
