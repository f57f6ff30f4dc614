"""AdaHessian for the Hugging Face stack: ``--optim adahessian`` in Trainer and Seq2SeqTrainer."""

from .arguments import AdaHessianSeq2SeqTrainingArguments, AdaHessianSettings, AdaHessianTrainingArguments
from .estimate import HessianEstimate, block_average
from .estimators import hutchinson_diagonal
from .hessian_pass import double_backward_ready
from .optimizer import AdaHessian
from .trainer import AdaHessianSeq2SeqTrainer, AdaHessianTrainer, AdaHessianTrainerMixin

__version__ = "0.2.0"

__all__ = [
    "AdaHessian",
    "AdaHessianSeq2SeqTrainer",
    "AdaHessianSeq2SeqTrainingArguments",
    "AdaHessianSettings",
    "AdaHessianTrainer",
    "AdaHessianTrainerMixin",
    "AdaHessianTrainingArguments",
    "HessianEstimate",
    "block_average",
    "double_backward_ready",
    "hutchinson_diagonal",
]
