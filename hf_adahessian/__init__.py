"""AdaHessian for the Hugging Face stack: ``--optim adahessian`` in Trainer and Seq2SeqTrainer."""

from .hutchinson import block_average, hutchinson_diagonal
from .optimizer import AdaHessian

__version__ = "0.1.0"

__all__ = [
    "AdaHessian",
    "block_average",
    "hutchinson_diagonal",
]
