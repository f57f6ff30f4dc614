"""What run_glue.py and run_translation.py share: arguments, logging, checkpoints, errors.

The Hugging Face example scripts repeat these lines in every script; here they
live once, so the two scripts keep only what is theirs (data and metrics).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import datasets
import transformers
from transformers import HfArgumentParser
from transformers.trainer import TRAINER_STATE_NAME

from hf_adahessian.arguments import is_adahessian
from hf_adahessian.trainer import check_resumable
from hf_adahessian.validation import AdaHessianUsageError

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class ModelArguments:
    """
    Arguments pertaining to which model/config/tokenizer we are going to fine-tune from.
    """

    model_name_or_path: str = field(
        metadata={"help": "Path to pretrained model or model identifier from huggingface.co/models"}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"}
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where do you want to store the pretrained models downloaded from huggingface.co"},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Whether to use one of the fast tokenizer (backed by the tokenizers library) or not."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: str = field(
        default=None,
        metadata={
            "help": (
                "The token to use as HTTP bearer authorization for remote files. If not specified, will use the token "
                "generated when running `hf auth login` (stored in `~/.huggingface`)."
            )
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": (
                "Whether to trust the execution of code from datasets/models defined on the Hub."
                " This option should only be set to `True` for repositories you trust and in which you have read the"
                " code, as it will execute code present on the Hub on your local machine."
            )
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )


class UsageError(ValueError):
    """Bad arguments or data: reported as one line and exit status 2, as argparse does, instead of a traceback."""


def parse_arguments(parser: HfArgumentParser) -> tuple:
    """The dataclasses from the command line, or from a single ``.json`` file argument."""
    try:
        if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
        return parser.parse_args_into_dataclasses()
    except ValueError as err:
        # The dataclasses' own checks (the script's, TrainingArguments', the optim_args parser) are usage errors.
        raise UsageError(str(err)) from err


def setup_logging(logger: logging.Logger, training_args) -> None:
    """Logging as the HF examples set it up: info on the main process, the Trainer's level elsewhere."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    # The library's own lines (the chunking chosen, the end-of-training summary) at the scripts' level too.
    logging.getLogger("hf_adahessian").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_rank}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")


def detect_last_checkpoint(logger: logging.Logger, training_args) -> str | None:
    """The newest complete checkpoint to resume from in ``output_dir``, refusing a non-empty one without any.

    A folder the Trainer was still writing when the run died (no readable
    ``trainer_state.json``, which it writes last) is skipped with a warning naming it.
    The checkpoint resumed from (this one or ``--resume_from_checkpoint``) must have
    been saved by the same kind of optimizer.
    """
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if not (os.path.isdir(training_args.output_dir) and training_args.do_train and not overwrite):
        if training_args.do_train and training_args.resume_from_checkpoint:
            check_resumable(training_args.resume_from_checkpoint, adahessian=is_adahessian(training_args))
        return None
    last_checkpoint = last_complete_checkpoint(training_args.output_dir, logger)
    if last_checkpoint is None and len(os.listdir(training_args.output_dir)) > 0:
        raise UsageError(
            f"--output_dir {training_args.output_dir} already exists and is not empty, with no complete checkpoint; "
            "use --overwrite_output_dir to train from scratch in it, or another --output_dir"
        )
    resume = training_args.resume_from_checkpoint or last_checkpoint
    if resume and os.path.isdir(resume):
        check_resumable(resume, adahessian=is_adahessian(training_args))
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            f"Checkpoint detected, resuming training at {last_checkpoint}. To avoid this behavior, change "
            "the `--output_dir` or add `--overwrite_output_dir` to train from scratch."
        )
    return last_checkpoint


def last_complete_checkpoint(output_dir: str, logger: logging.Logger) -> str | None:
    folders = [f for f in os.listdir(output_dir)
               if _CHECKPOINT.fullmatch(f) and os.path.isdir(os.path.join(output_dir, f))]
    for name in sorted(folders, key=lambda f: int(_CHECKPOINT.fullmatch(f).group(1)), reverse=True):
        folder = os.path.join(output_dir, name)
        try:
            with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            logger.warning(f"Skipping {folder}: it is incomplete (no readable {TRAINER_STATE_NAME}, which the "
                           "Trainer writes last); a run stopped while saving it. Resuming from an earlier one.")
            continue
        return folder
    return None


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a usage error (the script's or AdaHessian's) ends it with one line and status 2."""
    try:
        main()
    except (UsageError, AdaHessianUsageError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
