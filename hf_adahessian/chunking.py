"""``hessian_chunks=auto`` (the default): how many chunks the exact estimator splits a micro-batch into.

Chunks bound the double backward's graph to a chunk's rows; weighted by their shares of the
items they give the whole micro-batch's gradient and estimate, but only for a loss that is a
weighted sum over rows. A stock transformers head computes one (a mean over rows or label
tokens) under the Trainer's own ``compute_loss``; BatchNorm's batch statistics, a mixture of
experts' router loss (balanced over the whole batch), an in-batch contrastive loss or a custom
``compute_loss`` may not, and there a chunk would see another loss. So ``auto`` chunks only
what it can vouch for, and a micro-batch of at least ``AUTO_CHUNKS · MIN_ROWS_PER_CHUNK`` rows:

* the memory: 4 chunks bring the exact step's peak RSS to AdamW's on MiniLM/SST-2 at batch 16,
  32 and 64 (1.06×, 1.02×, 1.00× against 1.41×, 1.69×, 2.08× whole; BENCHMARKS.md);
* the time: each chunk repeats the graph's operator calls, about 7 µs each on a CPU core, which
  rows amortise: 4 chunks cost 1.19× the whole step's time at 4 rows a chunk, 1.10× at 8,
  0.96× at 16. Below 4 rows a chunk the calls would weigh more still (an extrapolation, not
  measured), so a micro-batch of fewer than 16 rows stays whole.

An explicit ``hessian_chunks=N`` is taken as given (the user vouches for the loss).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["AUTO_CHUNKS", "MIN_ROWS_PER_CHUNK", "why_not_chunked", "auto_chunks"]

logger = logging.getLogger(__name__)

AUTO_CHUNKS = 4
MIN_ROWS_PER_CHUNK = 4

# transformers' auto classes whose heads compute a mean over rows or over label tokens.
_PER_ROW_HEADS = (
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
)


def _per_row_head_names() -> frozenset[str]:
    from transformers.models.auto import modeling_auto

    return frozenset(name for table in _PER_ROW_HEADS for name in getattr(modeling_auto, table, {}).values())


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """Under DDP's wrapper and PEFT's, the transformers model."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def why_not_chunked(trainer, model: torch.nn.Module) -> str | None:
    """None when ``auto`` may chunk this trainer's loss on ``model``; else the reason it stays whole."""
    from transformers import Trainer

    from .trainer import AdaHessianTrainerMixin

    owner = next(c for c in type(trainer).__mro__ if "compute_loss" in vars(c) and c is not AdaHessianTrainerMixin)
    if owner is not Trainer:
        return f"{owner.__name__} computes its own loss"
    if trainer.compute_loss_func is not None:
        return "the Trainer was given a compute_loss_func"
    if trainer.label_smoother is not None:
        return "the loss is label-smoothed by the Trainer"
    inner = _inner_model(model)
    # FSDP2 swaps in a subclass of the model's class: any class of its MRO names the head.
    heads = _per_row_head_names()
    head = next((c.__name__ for c in type(inner).__mro__ if c.__name__ in heads), None)
    if head is None:
        return f"{type(inner).__name__} is not a transformers head whose loss is a mean over rows or tokens"
    if getattr(getattr(inner, "config", None), "output_router_logits", False):
        return "the router's auxiliary loss balances experts over the whole batch"
    norm = next((type(m).__name__ for m in inner.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)),
                None)
    if norm is not None:
        return f"the model has {norm}, whose statistics are the batch's"
    return None


def auto_chunks(inputs: dict) -> int:
    """``AUTO_CHUNKS`` for a micro-batch of at least ``AUTO_CHUNKS · MIN_ROWS_PER_CHUNK`` rows sharing one batch
    dimension, else 1."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        return 1
    return AUTO_CHUNKS if sizes.pop() >= AUTO_CHUNKS * MIN_ROWS_PER_CHUNK else 1
