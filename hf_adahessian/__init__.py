"""AdaHessian for the Hugging Face stack: ``--optim adahessian`` in Trainer and Seq2SeqTrainer."""

from .arguments import AdaHessianSeq2SeqTrainingArguments, AdaHessianTrainingArguments
from .hutchinson import block_average, hutchinson_diagonal
from .optimizer import AdaHessian
from .trainer import AdaHessianSeq2SeqTrainer, AdaHessianTrainer, AdaHessianTrainerMixin

__version__ = "0.1.0"

__all__ = [
    "AdaHessian",
    "AdaHessianSeq2SeqTrainer",
    "AdaHessianSeq2SeqTrainingArguments",
    "AdaHessianTrainer",
    "AdaHessianTrainerMixin",
    "AdaHessianTrainingArguments",
    "block_average",
    "hutchinson_diagonal",
]
