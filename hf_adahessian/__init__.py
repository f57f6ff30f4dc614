"""AdaHessian for the Hugging Face stack: ``--optim adahessian`` in Trainer and Seq2SeqTrainer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module.  Imported on first use, so that the model-building
# command and the metrics do not pay for importing the Trainer.
_EXPORTS = {
    "AdaHessian": "optimizer",
    "AdaHessianSeq2SeqTrainer": "trainer",
    "AdaHessianSeq2SeqTrainingArguments": "arguments",
    "AdaHessianTrainer": "trainer",
    "AdaHessianTrainerMixin": "trainer",
    "AdaHessianTrainingArguments": "arguments",
    "block_average": "hutchinson",
    "hutchinson_diagonal": "hutchinson",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .arguments import AdaHessianSeq2SeqTrainingArguments, AdaHessianTrainingArguments
    from .hutchinson import block_average, hutchinson_diagonal
    from .optimizer import AdaHessian
    from .trainer import AdaHessianSeq2SeqTrainer, AdaHessianTrainer, AdaHessianTrainerMixin


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_adahessian' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
