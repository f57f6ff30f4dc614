"""A stock-style causal-LM script that knows nothing of hf_adahessian, for tests/test_launch.py.

    python -m hf_adahessian.launch tests/scripts/stock_clm.py --model_name_or_path DIR \
        --train_file train.txt --validation_file valid.txt --block_size 32 --do_train --do_eval ...

Laid out as transformers' examples/pytorch/language-modeling/run_clm.py is: three
argument dataclasses through ``HfArgumentParser``, ``load_dataset("text")``, the
texts tokenized, concatenated and cut into blocks, ``AutoModelForCausalLM``,
``Trainer`` imported from ``transformers.trainer`` and ``TrainingArguments`` from
``transformers.training_args`` (the submodules), ``evaluate.load("accuracy")`` for
the next-token accuracy, and perplexity from the evaluation loss.  It prints

    RESULT {"optimizer": ..., "perplexity": ..., "eval_accuracy": ..., ...}
"""

import json
import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evaluate
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator, set_seed
from transformers.trainer import Trainer
from transformers.training_args import TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model folder"})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "a text file"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "a text file"})
    block_size: int = field(default=32, metadata={"help": "tokens per training example"})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    raw = load_dataset("text", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)

    tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    block = data_args.block_size

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        result = {k: [t[i: i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True)

    metric = evaluate.load("accuracy")

    def preprocess_logits_for_metrics(logits, labels):
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
        return metric.compute(predictions=preds, references=labels)

    trainer = Trainer(
        model=model, args=training_args, train_dataset=lm["train"],
        eval_dataset=lm.get("validation"), processing_class=tokenizer, data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    trainer.train()
    metrics = trainer.evaluate() if training_args.do_eval else {}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    print("RESULT " + json.dumps({
        "optimizer": type(optimizer).__name__,
        "trainer": type(trainer).__name__,
        "metric": repr(metric),
        "hessian_updates": [h.get("hessian_updates") for h in logs],
        "losses": [h["loss"] for h in logs],
        "perplexity": math.exp(metrics["eval_loss"]) if "eval_loss" in metrics else None,
        "eval_accuracy": metrics.get("eval_accuracy"),
    }), flush=True)


if __name__ == "__main__":
    main()
