#!/usr/bin/env python
# Copyright The HuggingFace Team and The HuggingFace Inc. team. All rights reserved.
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
"""
Causal language modelling (GPT-2, Llama, ...) on text files, with `--optim adahessian` available.

Laid out as transformers' examples/pytorch/language-modeling/run_clm.py (texts tokenized,
concatenated and cut into `--block_size` blocks, perplexity from the evaluation loss). What differs:
  * the trainer and its arguments are hf_adahessian's, so `--optim adahessian --optim_args ...` work;
  * local files only (.txt: a text per line; .json/.jsonl/.csv: `--text_column`, which may name a field
    inside a column, e.g. `translation.en` for Multi30k); the model comes from `--model_name_or_path`
    (a folder from `hf-adahessian-build-model --model_type gpt2` trains from scratch);
  * next-token accuracy is computed offline, not with `evaluate.load`;
  * auto-resume skips a checkpoint folder that a kill left incomplete, and says so;
  * bad arguments or data end in one line, `error: ...`, and exit status 2, instead of a traceback.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import numpy as np
from datasets import load_dataset

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator, set_seed

from hf_adahessian import AdaHessianTrainer, AdaHessianTrainingArguments
from hf_adahessian.examples.script_support import ModelArguments, UsageError, detect_last_checkpoint, parse_arguments, run_script, setup_logging


logger = logging.getLogger(__name__)

EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class DataTrainingArguments:
    """
    Arguments pertaining to what data we are going to input our model for training and eval.
    """

    train_file: Optional[str] = field(default=None, metadata={"help": "The training data: .txt, .json(l) or .csv."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Text to evaluate the perplexity on (same formats)."}
    )
    text_column: str = field(
        default="text",
        metadata={"help": "The column holding the text (json/csv); `a.b` reads field b of column a."},
    )
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens per training example after concatenation; default: the model's maximum length."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the training set to this many texts (before blocking)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many texts (before blocking)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training texts held out when there is no --validation_file."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "The number of processes to use for the preprocessing."}
    )

    def __post_init__(self):
        if self.train_file is None and self.validation_file is None:
            raise ValueError("Need a --train_file or a --validation_file (local files; this script reads no Hub data).")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if os.path.splitext(path)[1].lower() not in EXTENSIONS:
                raise ValueError(f"--{name} {path}: expected one of {', '.join(EXTENSIONS)}.")
            if not os.path.isfile(path):
                raise ValueError(f"--{name} {path}: no such file.")


def load_texts(path: str, text_column: str, limit: Optional[int]):
    """One split's texts as a dataset with a single `text` column."""
    kind = EXTENSIONS[os.path.splitext(path)[1].lower()]
    dataset = load_dataset(kind, data_files=path, split="train")
    if kind != "text":
        column, _, key = text_column.partition(".")
        if column not in dataset.column_names:
            raise UsageError(f"--text_column {text_column}: {path} has no column {column!r} "
                             f"(it has {', '.join(dataset.column_names)})")
        dataset = dataset.map(lambda row: {"text": row[column][key] if key else row[column]},
                              remove_columns=dataset.column_names)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, AdaHessianTrainingArguments))
    model_args, data_args, training_args = parse_arguments(parser)
    setup_logging(logger, training_args)
    last_checkpoint = detect_last_checkpoint(logger, training_args)
    set_seed(training_args.seed)

    raw = {}
    if data_args.train_file:
        raw["train"] = load_texts(data_args.train_file, data_args.text_column, data_args.max_train_samples)
    if data_args.validation_file:
        raw["validation"] = load_texts(data_args.validation_file, data_args.text_column, data_args.max_eval_samples)
    elif training_args.do_eval and "train" in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100,
                                              seed=training_args.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir,
        use_fast=model_args.use_fast_tokenizer, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code,
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    max_length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)
                     or getattr(model.config, "n_positions", None) or tokenizer.model_max_length)
    block_size = data_args.block_size or min(max_length, 1024)
    if block_size > max_length:
        raise UsageError(f"--block_size {block_size} is longer than the model's maximum length ({max_length})")

    def group_texts(examples):
        # Concatenate all texts, then cut into blocks; the remainder shorter than a block is dropped.
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm = {}
    for split, dataset in raw.items():
        with training_args.main_process_first(desc=f"tokenizing and grouping {split}"):
            tokenized = dataset.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"],
                                    num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {split}")
            lm[split] = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers,
                                      desc=f"Grouping {split} into blocks of {block_size}")
        if len(lm[split]) == 0:
            raise UsageError(f"the {split} texts make no block of {block_size} tokens: lower --block_size")
    if training_args.do_train and "train" not in lm:
        raise UsageError("--do_train requires a --train_file")

    def preprocess_logits_for_metrics(logits, labels):
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        # The prediction at position i is for the token at i + 1.
        labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
        keep = labels != -100
        return {"accuracy": float(np.mean(preds[keep] == labels[keep]))}

    trainer = AdaHessianTrainer(
        model=model,
        args=training_args,
        train_dataset=lm.get("train") if training_args.do_train else None,
        eval_dataset=lm.get("validation") if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(lm["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(lm["validation"])
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    run_script(main)
