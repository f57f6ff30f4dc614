"""``--use_peft``: LoRA adapters for the example scripts, with the flag names of TRL's ``ModelConfig``.

A TRL user already types ``--use_peft --lora_r 16 --lora_target_modules q_proj v_proj``; the
same flags on ``run_glue.py`` mean the same thing, so a recipe carries over.  peft is imported
only when ``--use_peft`` is given (``pip install 'hf-adahessian[peft]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .script_support import UsageError

__all__ = ["LoraArguments", "apply_lora"]


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of the whole model."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (TRL's default)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (TRL's default)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (TRL's default)."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Module names to adapt (e.g. query value); default: peft's choice for the architecture."},
    )
    lora_modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters; default: the task head (peft's SEQ_CLS rule)."},
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise UsageError(f"--lora_r {self.lora_r}: the rank must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")


def apply_lora(model, args: LoraArguments, task_type: str):
    """``model`` wrapped in LoRA adapters when ``--use_peft`` is on (else ``model`` as it is)."""
    if not args.use_peft:
        return model
    try:
        import peft
    except ImportError as err:
        raise UsageError("--use_peft needs peft: pip install 'hf-adahessian[peft]'") from err
    config = peft.LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type=task_type,
        target_modules=args.lora_target_modules, modules_to_save=args.lora_modules_to_save,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # an unknown target module, or no default for this architecture
        raise UsageError(f"--use_peft: {err} (name the layers with --lora_target_modules)") from err
