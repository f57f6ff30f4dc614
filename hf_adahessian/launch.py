"""Run a stock script with ``--optim adahessian`` working, unmodified.

    python -m hf_adahessian.launch run_glue.py --optim adahessian ...
    accelerate launch -m hf_adahessian.launch run_glue.py --optim adahessian ...

The script's ``from transformers import Trainer, TrainingArguments`` (and the
Seq2Seq pair) resolve to the AdaHessian subclasses, which behave exactly as the
stock classes for every other ``--optim``.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

from .arguments import AdaHessianSeq2SeqTrainingArguments, AdaHessianTrainingArguments
from .trainer import AdaHessianSeq2SeqTrainer, AdaHessianTrainer

SUBSTITUTES = {
    "Trainer": AdaHessianTrainer,
    "TrainingArguments": AdaHessianTrainingArguments,
    "Seq2SeqTrainer": AdaHessianSeq2SeqTrainer,
    "Seq2SeqTrainingArguments": AdaHessianSeq2SeqTrainingArguments,
}


def substitute_classes() -> None:
    """Point ``transformers.Trainer`` & co. at the AdaHessian subclasses."""
    # Importing the Trainer re-executes transformers' __init__ and replaces the
    # module in sys.modules, so patch the one that a script's import will find.
    module = sys.modules.get("transformers") or importlib.import_module("transformers")
    for name, cls in SUBSTITUTES.items():
        setattr(module, name, cls)


USAGE = "usage: python -m hf_adahessian.launch SCRIPT.py [SCRIPT ARGS ...]"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"error: script not found: {script}\n{USAGE}")
    substitute_classes()
    sys.argv = [script, *argv[1:]]
    # As `python SCRIPT` does, so that the script's sibling modules import.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
