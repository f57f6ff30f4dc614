"""Run a stock script with ``--optim adahessian`` working, unmodified.

    python -m hf_adahessian.launch run_glue.py --optim adahessian ...
    accelerate launch -m hf_adahessian.launch run_clm.py --optim adahessian ...

The script's ``Trainer`` and ``TrainingArguments`` (and the Seq2Seq pair), whether it
imports them from ``transformers`` or from ``transformers.trainer`` /
``transformers.training_args`` / ``transformers.trainer_seq2seq`` /
``transformers.training_args_seq2seq``, resolve to the AdaHessian subclasses, which
behave exactly as the stock classes for every other ``--optim``.  A script that
imports ``trl`` gets ``SFTTrainer``/``SFTConfig`` substituted too (with trl installed).

Offline, ``evaluate.load`` needs the Hub for every metric script; where a script
asks for one this package computes offline (``accuracy``, ``glue`` with a task,
``sacrebleu``), the launcher hands it that instead, and leaves every other name to
``evaluate``.

A class defined by the script itself on top of a stock class (``class MyTrainer(Trainer)``
written before the launcher could act, or imported from another package) is not
reached: such a trainer takes ``AdaHessianTrainerMixin`` as its first base instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import runpy
import sys

from .arguments import AdaHessianSeq2SeqTrainingArguments, AdaHessianTrainingArguments
from .trainer import AdaHessianSeq2SeqTrainer, AdaHessianTrainer

# module -> {name: substitute}; the top-level names and the modules that define them.
SUBSTITUTES = {
    "transformers": {
        "Trainer": AdaHessianTrainer,
        "TrainingArguments": AdaHessianTrainingArguments,
        "Seq2SeqTrainer": AdaHessianSeq2SeqTrainer,
        "Seq2SeqTrainingArguments": AdaHessianSeq2SeqTrainingArguments,
    },
    "transformers.trainer": {"Trainer": AdaHessianTrainer},
    "transformers.training_args": {"TrainingArguments": AdaHessianTrainingArguments},
    "transformers.trainer_seq2seq": {"Seq2SeqTrainer": AdaHessianSeq2SeqTrainer},
    "transformers.training_args_seq2seq": {"Seq2SeqTrainingArguments": AdaHessianSeq2SeqTrainingArguments},
}

_IMPORTS_TRL = re.compile(r"^\s*(from|import)\s+trl\b", re.M)
_IMPORTS_EVALUATE = re.compile(r"^\s*(from|import)\s+evaluate\b", re.M)


def substitute_classes() -> None:
    """Point ``transformers.Trainer`` & co. (and the modules defining them) at the AdaHessian subclasses."""
    for module_name, names in SUBSTITUTES.items():
        # Importing the Trainer re-executes transformers' __init__ and replaces the
        # module in sys.modules, so patch the one that a script's import will find.
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for name, cls in names.items():
            setattr(module, name, cls)


def substitute_trl() -> None:
    """``trl.SFTTrainer`` / ``trl.SFTConfig`` -> the AdaHessian subclasses (trl imported first, on stock classes)."""
    import trl

    from .trl_trainer import AdaHessianSFTConfig, AdaHessianSFTTrainer

    for module in (trl, sys.modules.get("trl.trainer"), sys.modules.get("trl.trainer.sft_trainer"),
                   sys.modules.get("trl.trainer.sft_config")):
        if module is None:
            continue
        if hasattr(module, "SFTTrainer"):
            module.SFTTrainer = AdaHessianSFTTrainer
        if hasattr(module, "SFTConfig"):
            module.SFTConfig = AdaHessianSFTConfig


def offline_evaluate() -> None:
    """``evaluate.load(name)`` for the metrics this package computes offline, when the Hub is off."""
    import evaluate

    try:
        from .examples.metrics import offline_metric
    except ImportError:  # the examples extra is not installed: evaluate as it is
        return

    original = evaluate.load
    if getattr(original, "_hf_adahessian", False):
        return

    def load(path, config_name=None, *args, **kwargs):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        metric = offline_metric(path, config_name) if offline else None
        return metric if metric is not None else original(path, config_name, *args, **kwargs)

    load._hf_adahessian = True
    evaluate.load = load


USAGE = "usage: python -m hf_adahessian.launch SCRIPT.py [SCRIPT ARGS ...]"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"error: script not found: {script}\n{USAGE}")
    with open(script, encoding="utf-8", errors="replace") as f:
        source = f.read()
    # trl first, so that its classes are built on the stock ones and then substituted whole.
    if _IMPORTS_TRL.search(source) and importlib.util.find_spec("trl") is not None:
        substitute_trl()
    substitute_classes()
    if _IMPORTS_EVALUATE.search(source) and importlib.util.find_spec("evaluate") is not None:
        offline_evaluate()
    sys.argv = [script, *argv[1:]]
    # As `python SCRIPT` does, so that the script's sibling modules import.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code == 2 and "adahessian" in argv:
            print(NOT_RECOGNISED, file=sys.stderr)
        raise


NOT_RECOGNISED = (
    "hf_adahessian.launch: if argparse said \"invalid choice: 'adahessian'\" above, the script's arguments "
    "class was not built on transformers' TrainingArguments (or trl's SFTConfig) as the launcher substitutes them, "
    "for example a class made by a package imported before the launcher ran. Build that class on "
    "hf_adahessian.AdaHessianTrainingArguments, and its trainer with hf_adahessian.AdaHessianTrainerMixin first."
)


if __name__ == "__main__":
    main()
