"""A stock-style training script that knows nothing of hf_adahessian, for tests/test_launch.py.

    python -m hf_adahessian.launch tests/scripts/stock_train.py --optim adahessian --output_dir DIR ...

It builds ``TrainingArguments`` with ``HfArgumentParser`` and a ``Trainer`` from
``transformers``, as the example scripts do (importing the Seq2Seq pair too), trains a tiny BERT classifier on a
few random rows, and prints one line per process:

    RESULT {"optimizer": ..., "hessian_mean_logged": ..., ...}
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)


def main():
    parser = HfArgumentParser((TrainingArguments,))
    (training_args,) = parser.parse_args_into_dataclasses()

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    train_dataset = [
        {
            "input_ids": torch.randint(0, 64, (8,), generator=g),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    result = trainer.train()

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    # One write, starting on a fresh line: under a launcher two ranks share the pipe,
    # and print() writes the text and its newline separately.
    sys.stdout.write("\nRESULT " + json.dumps({
        "rank": training_args.process_index,
        "world_size": training_args.world_size,
        "trainer": type(trainer).__name__,
        "training_args": type(training_args).__name__,
        "model_wrapped": type(trainer.model_wrapped).__name__,
        "optimizer": type(optimizer).__name__,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "global_step": result.global_step,
        "n_loss_logs": len(logs),
        "hessian_mean_logged": bool(logs) and all("hessian_mean" in log for log in logs),
        "hessian_means": [log.get("hessian_mean") for log in logs],
        "train_loss": result.training_loss,
        # What this script's `from transformers import ...` resolved to.
        "imported": {cls.__name__: cls.__module__
                     for cls in (Trainer, TrainingArguments, Seq2SeqTrainer, Seq2SeqTrainingArguments)},
    }) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
