"""TRL's ``SFTTrainer`` and ``SFTConfig`` in which ``--optim adahessian`` trains with AdaHessian.

Needs the ``trl`` package (``pip install "hf-adahessian[trl]"``).  A script of your
own can use these classes, or put ``AdaHessianTrainerMixin`` first in its own
subclass of ``SFTTrainer``; ``python -m hf_adahessian.launch`` substitutes them in an
unmodified TRL script.

TRL computes the loss through a fused LM head (a custom autograd kernel without a
double backward).  With the finite-difference estimator it runs untouched; the
exact estimator computes the same NLL through the model's plain forward on Hessian
micro-batches (``AdaHessianTrainerMixin.compute_loss``), where TRL's entropy and
token-accuracy metrics are therefore not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .arguments import _AdaHessianArgumentsMixin
from .trainer import AdaHessianTrainerMixin

__all__ = ["AdaHessianSFTConfig", "AdaHessianSFTTrainer"]


@dataclass
class AdaHessianSFTConfig(_AdaHessianArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` in which ``--optim adahessian`` parses."""


class AdaHessianSFTTrainer(AdaHessianTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` in which ``--optim adahessian`` trains with AdaHessian."""
