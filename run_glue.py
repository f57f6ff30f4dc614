#!/usr/bin/env python
# Copyright 2020 The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Finetuning the library models for sequence classification on GLUE, with `--optim adahessian` available.

A port of transformers' examples/pytorch/text-classification/run_glue.py (5.x). What differs:
  * the trainer and its arguments are hf_adahessian's, so `--optim adahessian --optim_args "hessian_power=0.5,..."`
    work; every other flag is the stock Trainer's;
  * metrics are computed offline (hf_adahessian.examples.metrics), not with `evaluate.load`;
  * with `--task_name`, local `--train_file`/`--validation_file`/`--test_file` are read with that GLUE task's columns,
    label names (labels may be ids or names) and metric, so GLUE data need not come from the Hub; `--dataset_name`
    wins over the Hub's GLUE when both are given;
  * local files are loaded one at a time, so a test file may come without labels; `.jsonl` is accepted;
  * `--do_predict` no longer needs a test split unless it is asked for; `--preprocessing_num_workers` is there;
  * `--overwrite_output_dir`, which transformers 5 dropped, is back (in the AdaHessian argument classes);
  * `--use_peft` (with TRL's `--lora_r`, `--lora_alpha`, `--lora_dropout`, `--lora_target_modules`) trains LoRA
    adapters and the new head instead of the whole model (needs peft: `pip install 'hf-adahessian[peft]'`);
  * auto-resume skips a checkpoint folder that a kill left incomplete, and says so;
  * bad arguments or data end in one line, `error: ...`, and exit status 2, instead of a traceback.
"""
# You can also adapt this script on your own text classification task. Pointers for this are left as comments.

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from datasets import DatasetDict, load_dataset

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedConfig,
    default_data_collator,
    set_seed,
)

from hf_adahessian import AdaHessianTrainer, AdaHessianTrainingArguments
from hf_adahessian.examples.script_support import ModelArguments, UsageError, detect_last_checkpoint, parse_arguments, run_script, setup_logging
from hf_adahessian.examples.lora import LoraArguments, apply_lora
from hf_adahessian.examples.metrics import GLUE_TASKS, glue_metrics


logger = logging.getLogger(__name__)

LOCAL_FILE_EXTENSIONS = ("csv", "json", "jsonl")



@dataclass
class DataTrainingArguments:
    """
    Arguments pertaining to what data we are going to input our model for training and eval.

    Using `HfArgumentParser` we can turn this class
    into argparse arguments to be able to specify them on
    the command line.
    """

    task_name: Optional[str] = field(
        default=None,
        metadata={"help": "The name of the task to train on: " + ", ".join(GLUE_TASKS.keys())},
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": (
                "The maximum total input sequence length after tokenization. Sequences longer "
                "than this will be truncated, sequences shorter will be padded."
            )
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."}
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether to pad all samples to `max_seq_length`. "
                "If False, will pad the samples dynamically when batching to the maximum length in the batch."
            )
        },
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None,
        metadata={"help": "The number of processes to use for the preprocessing."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of training examples to this "
                "value if set."
            )
        },
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of evaluation examples to this "
                "value if set."
            )
        },
    )
    max_predict_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of prediction examples to this "
                "value if set."
            )
        },
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "A csv or a json file containing the training data."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "A csv or a json file containing the validation data."}
    )
    test_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file containing the test data."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in GLUE_TASKS:
                raise UsageError(
                    f"--task_name {self.task_name!r} is not a GLUE task; pick one of: {', '.join(GLUE_TASKS)}"
                )
        local_files = {
            "--train_file": self.train_file,
            "--validation_file": self.validation_file,
            "--test_file": self.test_file,
        }
        local_files = {flag: path for flag, path in local_files.items() if path is not None}
        if self.task_name is None and self.dataset_name is None and (
            self.train_file is None or self.validation_file is None
        ):
            raise UsageError(
                "need data: pass --task_name, --dataset_name, or both --train_file and --validation_file"
            )
        extensions = set()
        for flag, path in local_files.items():
            extension = path.split(".")[-1].lower()
            if extension not in LOCAL_FILE_EXTENSIONS:
                raise UsageError(f"{flag} {path!r} should be a .csv, .json or .jsonl file")
            if not os.path.isfile(path):
                raise UsageError(f"{flag} {path!r}: no such file")
            extensions.add("csv" if extension == "csv" else "json")
        if len(extensions) > 1:
            raise UsageError(
                "--train_file, --validation_file and --test_file should all be csv or all be json lines"
            )


def _source(data_args, split):
    """How the user named a split: its file flag, or the split of --dataset_name / the Hub's GLUE."""
    local_files = data_args.dataset_name is None and (
        data_args.train_file or data_args.validation_file or data_args.test_file
    )
    split_flags = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
    return split_flags[split] if local_files else f"the {split!r} split"


def check_columns(raw_datasets, data_args):
    """Fail early, naming the file, on data the task cannot use (instead of a KeyError deep inside `map`)."""
    task = GLUE_TASKS[data_args.task_name] if data_args.task_name is not None else None
    for split, dataset in raw_datasets.items():
        source = _source(data_args, split)
        if task is not None:
            for key in task.keys:
                if key is not None and key not in dataset.column_names:
                    raise UsageError(
                        f"{source} has no {key!r} column, which --task_name {data_args.task_name} needs "
                        f"(columns found: {', '.join(dataset.column_names)})"
                    )
                # An empty csv cell or a key left out of a json line: the tokenizer would fail on None mid-map.
                if key is not None and dataset.data.column(key).null_count:
                    raise UsageError(
                        f"{source}: {dataset.data.column(key).null_count} of {len(dataset)} rows have no {key!r} text"
                    )
        if "label" not in dataset.column_names:
            if split.startswith("test"):
                continue  # test sets may come unlabelled
            raise UsageError(f"{source} has no 'label' column (columns found: {', '.join(dataset.column_names)})")
        if dataset.data.column("label").null_count:
            missing = dataset.data.column("label").null_count
            raise UsageError(f"{source}: {missing} of {len(dataset)} rows have no label")


def check_labels(raw_datasets, data_args, label_list, label_split):
    """Every label is one the model knows: a GLUE task's id or name, or without a task, one seen in `label_split`."""
    allowed = set(label_list) | {-1}  # -1 marks GLUE's hidden test labels
    if data_args.task_name is not None:
        allowed |= set(range(len(label_list)))
        hint = (
            f"that --task_name {data_args.task_name} does not know; use the ids 0..{len(label_list) - 1} "
            f"or the names {', '.join(label_list)}"
        )
    else:
        hint = f"not found in {_source(data_args, label_split)}, whose labels are: {', '.join(map(str, label_list))}"
    for split, dataset in raw_datasets.items():
        if "label" not in dataset.column_names:
            continue
        unknown = sorted({str(v) for v in dataset.unique("label") if v not in allowed})
        if unknown:
            raise UsageError(f"{_source(data_args, split)} has label value(s) {', '.join(unknown)} {hint}")


def main():
    # See all possible arguments in src/transformers/training_args.py and hf_adahessian/arguments.py
    # or by passing the --help flag to this script.
    # We now keep distinct sets of args, for a cleaner separation of concerns.

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, AdaHessianTrainingArguments, LoraArguments))
    model_args, data_args, training_args, lora_args = parse_arguments(parser)
    setup_logging(logger, training_args)
    last_checkpoint = detect_last_checkpoint(logger, training_args)

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: you can either provide your own CSV/JSON training and evaluation files (see below)
    # or specify a GLUE benchmark task (the dataset will be downloaded automatically from the datasets Hub).
    #
    # For CSV/JSON files, this script will use as labels the column called 'label' and as pair of sentences the
    # sentences in columns called 'sentence1' and 'sentence2' if such column exists or the first two columns not named
    # label if at least two columns are provided. With --task_name, the GLUE task's columns are used instead.
    #
    # If the CSVs/JSONs contain only one non-label column, the script does single sentence classification on this
    # single column. You can easily tweak this behavior (see below)
    #
    # In distributed training, the load_dataset function guarantee that only one local process can concurrently
    # download the dataset.
    if data_args.dataset_name is not None:
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.task_name is not None and not (
        data_args.train_file or data_args.validation_file or data_args.test_file
    ):
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            "nyu-mll/glue",
            data_args.task_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        # Loading a dataset from your local files.
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file

        # Get the test dataset: you can provide your own CSV/JSON test file (see below)
        # when you use `do_predict` without specifying a GLUE benchmark task.
        if training_args.do_predict:
            if data_args.test_file is not None:
                data_files["test"] = data_args.test_file
            else:
                raise UsageError("--do_predict with local files needs a --test_file")

        for key in data_files.keys():
            logger.info(f"load a local file for {key}: {data_files[key]}")

        builder_name = "csv" if next(iter(data_files.values())).endswith(".csv") else "json"
        # One file at a time: loaded together, every file is cast to the first one's columns, so an unlabelled test
        # file or labels written as names in one file would fail deep inside `datasets` instead of being checked below.
        raw_datasets = DatasetDict(
            {
                split: load_dataset(
                    builder_name,
                    data_files=path,
                    split="train",
                    cache_dir=model_args.cache_dir,
                    token=model_args.token,
                )
                for split, path in data_files.items()
            }
        )
    # See more about loading any type of standard or custom dataset at
    # https://huggingface.co/docs/datasets/loading_datasets.

    check_columns(raw_datasets, data_args)

    # Labels
    label_split = "train" if "train" in raw_datasets else "validation"
    if data_args.task_name is None and label_split not in raw_datasets:
        raise UsageError("without --task_name the labels are read from --train_file or --validation_file: pass one")
    if data_args.task_name is not None:
        is_regression = GLUE_TASKS[data_args.task_name].is_regression
        if not is_regression:
            label_list = list(GLUE_TASKS[data_args.task_name].label_names)
            num_labels = len(label_list)
        else:
            label_list = None
            num_labels = 1
    else:
        # Trying to have good defaults here, don't hesitate to tweak to your needs.
        is_regression = raw_datasets[label_split].features["label"].dtype in ["float32", "float64"]
        if is_regression:
            label_list = None
            num_labels = 1
        else:
            # A useful fast method:
            # https://huggingface.co/docs/datasets/package_reference/main_classes#datasets.Dataset.unique
            label_list = raw_datasets[label_split].unique("label")
            label_list.sort()  # Let's sort it for determinism
            num_labels = len(label_list)
    if not is_regression:
        check_labels(raw_datasets, data_args, label_list, label_split)

    # Load pretrained model and tokenizer
    #
    # In distributed training, the .from_pretrained methods guarantee that only one local process can concurrently
    # download model & vocab.
    config = AutoConfig.from_pretrained(
        model_args.config_name if model_args.config_name else model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name if model_args.tokenizer_name else model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        use_fast=model_args.use_fast_tokenizer,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    # --use_peft: LoRA adapters (and the new head) are what trains; the base stays frozen.
    model = apply_lora(model, lora_args, task_type="SEQ_CLS")

    # Preprocessing the raw_datasets
    if data_args.task_name is not None:
        sentence1_key, sentence2_key = GLUE_TASKS[data_args.task_name].keys
    else:
        # Again, we try to have some nice defaults but don't hesitate to tweak to your use case.
        # Only text columns: an id column (SST-2's `idx`) would otherwise be taken for the second sentence.
        non_label_column_names = [
            name
            for name, feature in raw_datasets[label_split].features.items()
            if name != "label" and getattr(feature, "dtype", None) in ("string", "large_string")
        ]
        if not non_label_column_names:
            raise UsageError(
                f"{_source(data_args, label_split)} has no text column besides 'label' "
                f"(columns found: {', '.join(raw_datasets[label_split].column_names)})"
            )
        if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        else:
            if len(non_label_column_names) >= 2:
                sentence1_key, sentence2_key = non_label_column_names[:2]
            else:
                sentence1_key, sentence2_key = non_label_column_names[0], None

    # Padding strategy
    if data_args.pad_to_max_length:
        padding = "max_length"
    else:
        # We will pad later, dynamically at batch creation, to the max sequence length in each batch
        padding = False

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (
        model.config.label2id != PreTrainedConfig(num_labels=num_labels).label2id
        and data_args.task_name is not None
        and not is_regression
    ):
        # Some have all caps in their config, some don't.
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id.keys()) == sorted(label_list):
            label_to_id = {i: int(label_name_to_id[label_list[i]]) for i in range(num_labels)}
        else:
            logger.warning(
                "Your model seems to have been trained with labels, but they don't match the dataset: "
                f"model labels: {sorted(label_name_to_id.keys())}, dataset labels: {sorted(label_list)}."
                "\nIgnoring the model labels as a result.",
            )
    elif data_args.task_name is None and not is_regression:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in config.label2id.items()}
    elif data_args.task_name is not None and not is_regression:
        model.config.label2id = {l: i for i, l in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in config.label2id.items()}

    # Local GLUE files may spell labels by name ("positive") as well as by id (1).
    name_to_index = {name: i for i, name in enumerate(label_list)} if data_args.task_name and label_list else {}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum length for the "
            f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        # Tokenize the texts
        args = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*args, padding=padding, max_length=max_seq_length, truncation=True)

        # Map labels to IDs (not necessary for GLUE tasks)
        if "label" in examples:
            labels = [name_to_index.get(l, l) for l in examples["label"]]
            if label_to_id is not None:
                labels = [(label_to_id[l] if l != -1 else -1) for l in labels]
            result["label"] = labels
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )
    if training_args.do_train:
        if "train" not in raw_datasets:
            raise UsageError("--do_train requires a train dataset: pass --train_file")
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            max_train_samples = min(len(train_dataset), data_args.max_train_samples)
            train_dataset = train_dataset.select(range(max_train_samples))

    if training_args.do_eval:
        if "validation" not in raw_datasets and "validation_matched" not in raw_datasets:
            raise UsageError("--do_eval requires a validation dataset: pass --validation_file")
        eval_dataset = raw_datasets["validation_matched" if "validation_matched" in raw_datasets else "validation"]
        if data_args.max_eval_samples is not None:
            max_eval_samples = min(len(eval_dataset), data_args.max_eval_samples)
            eval_dataset = eval_dataset.select(range(max_eval_samples))

    if training_args.do_predict:
        if "test" not in raw_datasets and "test_matched" not in raw_datasets:
            raise UsageError("--do_predict requires a test dataset: pass --test_file")
        predict_dataset = raw_datasets["test_matched" if "test_matched" in raw_datasets else "test"]
        if data_args.max_predict_samples is not None:
            max_predict_samples = min(len(predict_dataset), data_args.max_predict_samples)
            predict_dataset = predict_dataset.select(range(max_predict_samples))

    # Log a few random samples from the training set:
    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # You can define your custom compute_metrics function. It takes an `EvalPrediction` object (a namedtuple with a
    # predictions and label_ids field) and has to return a dictionary string to float.
    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        if data_args.task_name is not None:
            result = glue_metrics(data_args.task_name, preds, p.label_ids)
        elif is_regression:
            result = {"mse": float(((preds - p.label_ids) ** 2).mean())}
        else:
            result = {"accuracy": float((preds == p.label_ids).mean())}
        if len(result) > 1:
            result["combined_score"] = np.mean(list(result.values())).item()
        return result

    # Data collator will default to DataCollatorWithPadding when the tokenizer is passed to Trainer, so we change it if
    # we already did the padding.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = None

    # Initialize our Trainer
    trainer = AdaHessianTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
    )

    # Training
    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None:
            checkpoint = training_args.resume_from_checkpoint
        elif last_checkpoint is not None:
            checkpoint = last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        max_train_samples = (
            data_args.max_train_samples if data_args.max_train_samples is not None else len(train_dataset)
        )
        metrics["train_samples"] = min(max_train_samples, len(train_dataset))

        trainer.save_model()  # Saves the tokenizer too for easy upload

        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # Evaluation
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        if data_args.task_name == "mnli" and "validation_mismatched" in raw_datasets:
            tasks.append("mnli-mm")
            valid_mm_dataset = raw_datasets["validation_mismatched"]
            if data_args.max_eval_samples is not None:
                max_eval_samples = min(len(valid_mm_dataset), data_args.max_eval_samples)
                valid_mm_dataset = valid_mm_dataset.select(range(max_eval_samples))
            eval_datasets.append(valid_mm_dataset)
            combined = {}

        for eval_dataset, task in zip(eval_datasets, tasks):
            metrics = trainer.evaluate(eval_dataset=eval_dataset)

            max_eval_samples = (
                data_args.max_eval_samples if data_args.max_eval_samples is not None else len(eval_dataset)
            )
            metrics["eval_samples"] = min(max_eval_samples, len(eval_dataset))

            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            if len(tasks) > 1:
                combined.update(metrics)

            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", combined if len(tasks) > 1 else metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        predict_datasets = [predict_dataset]
        if data_args.task_name == "mnli" and "test_mismatched" in raw_datasets:
            tasks.append("mnli-mm")
            predict_datasets.append(raw_datasets["test_mismatched"])

        for predict_dataset, task in zip(predict_datasets, tasks):
            # Removing the `label` columns because it contains -1 and Trainer won't like that.
            if "label" in predict_dataset.column_names:
                predict_dataset = predict_dataset.remove_columns("label")
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)

            output_predict_file = os.path.join(training_args.output_dir, f"predict_results_{task}.txt")
            if trainer.is_world_process_zero():
                with open(output_predict_file, "w") as writer:
                    logger.info(f"***** Predict results {task} *****")
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(np.atleast_1d(predictions)):
                        if is_regression:
                            writer.write(f"{index}\t{item:3.3f}\n")
                        else:
                            item = label_list[item]
                            writer.write(f"{index}\t{item}\n")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


def _mp_fn(index):
    # For xla_spawn (TPUs)
    main()


if __name__ == "__main__":
    run_script(main)
