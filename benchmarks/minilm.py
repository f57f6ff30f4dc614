"""The step profiles' model and batch: the pretrained MiniLM, 16 SST-2 training sentences padded to 64 tokens."""

from __future__ import annotations

import json
from pathlib import Path

from hf_adahessian.examples.demo import minilm_folder

from .data import require_data

BATCH_SIZE, MAX_LENGTH = 16, 64


def load_batch(tokenizer, data_dir: Path, n: int = BATCH_SIZE, length: int = MAX_LENGTH) -> dict:
    import torch

    sentences, labels = [], []
    with open(require_data(data_dir, "sst2", ("train.jsonl",)) / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            sentences.append(row["sentence"])
            labels.append(row["label"])
            if len(sentences) == n:
                break
    batch = dict(tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    return batch


def setup(threads: int, data_dir: Path) -> dict:
    """Threads, quiet transformers, a fixed seed; the profiled batch."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return load_batch(AutoTokenizer.from_pretrained(minilm_folder()), data_dir)


def minilm_for_training():
    """The pretrained MiniLM with a fresh 2-label head, in train mode, and its trainable parameters."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]
