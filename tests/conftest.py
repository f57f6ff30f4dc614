"""Shared builders for the trainer and argument tests: tiny models, tiny datasets, arguments.

Every model is built from a config (no download) under a fixed seed, with dropout
0 unless asked otherwise, so two builds with the same seed are the same model.
"""

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_adahessian import AdaHessianTrainingArguments

VOCAB = 100


def tiny_bert_config(**overrides) -> BertConfig:
    config = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config.update(overrides)
    return BertConfig(**config)


@pytest.fixture
def make_bert():
    """``make_bert(seed=0, **config_overrides)``: a tiny BertForSequenceClassification."""

    def build(seed: int = 0, **overrides) -> BertForSequenceClassification:
        torch.manual_seed(seed)
        return BertForSequenceClassification(tiny_bert_config(**overrides))

    return build


def token_dataset(n: int = 64, seq_len: int = 8, vocab: int = VOCAB, seed: int = 0) -> datasets.Dataset:
    """Random token ids; ``labels`` is the parity of the first token, which a tiny model can learn."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, seq_len), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


@pytest.fixture
def make_dataset():
    """``make_dataset(n=64, seq_len=8, vocab=100, seed=0)``: see :func:`token_dataset`."""
    return token_dataset


@pytest.fixture
def make_args(tmp_path):
    """``make_args(**overrides)``: AdaHessian arguments for a short CPU run that writes nothing."""

    def build(args_class=AdaHessianTrainingArguments, **overrides):
        kwargs = dict(
            output_dir=str(tmp_path / "out"), optim="adahessian", learning_rate=0.05,
            use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=8, max_steps=3, logging_steps=1, seed=0,
        )
        kwargs.update(overrides)
        return args_class(**kwargs)

    return build
