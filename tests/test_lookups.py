"""Embedding lookups through row leaves (``lookups.compact_lookups``) on the exact estimator's pass.

The specification is an equivalence: with the lookups compacted, the estimate and the
gradient are the ones the dense lookup gives, for plain, padded, tied and subclassed
embeddings and several probes; what changes is that a chunk of a micro-batch makes no
vocabulary-sized tensor, so only the step's gradient and sum are that size.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_adahessian import AdaHessian, double_backward_ready
from hf_adahessian.lookups import compact_lookups

VOCAB, WIDTH = 50, 6


def _batch(seed: int = 0, rows: int = 4, length: int = 7, pad: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        ids[:, -2:] = 0  # the pad token, BERT's padding_idx
        mask[:, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(rows) % 2}


def _estimate_and_grads(model, batches: list[dict], compact: bool, n_samples: int = 1):
    """The sums and ``.grad`` after the exact estimator's pass over ``batches`` (one step's chunks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    est = AdaHessian(params, lr=1e-3, seed=3, n_samples=n_samples).estimate()
    for batch in batches:
        with double_backward_ready(model), \
                compact_lookups(model, est.params) if compact else contextlib.nullcontext() as lookups:
            loss = model(**batch).loss
            est.accumulate(loss, rows=lookups.take() if compact else ())
    return [s.clone() for s in est.filled()], [None if p.grad is None else p.grad.clone() for p in params]


def _assert_same(a: list, b: list) -> None:
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_compacted_lookups_give_the_dense_estimate_and_gradient(make_bert, n_samples):
    model = make_bert(vocab_size=VOCAB, seed=1)
    batches = [_batch(0), _batch(1, rows=3)]
    dense = _estimate_and_grads(model, batches, compact=False, n_samples=n_samples)
    compact = _estimate_and_grads(model, batches, compact=True, n_samples=n_samples)
    _assert_same(dense[0], compact[0])
    _assert_same(dense[1], compact[1])
    word = model.bert.embeddings.word_embeddings.weight
    index = [i for i, p in enumerate(model.parameters()) if p is word][0]
    used = torch.unique(torch.cat([b["input_ids"].flatten() for b in batches]))
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[used] = False
    # Rows no lookup read: exactly zero; the padding row (read, but padding_idx): zero gradient.
    assert compact[0][index][unused].eq(0).all() and compact[1][index][unused].eq(0).all()
    assert compact[1][index][0].eq(0).all()
    assert compact[0][index][used[used != 0]].abs().sum(dim=1).gt(0).all()


class _TiedLM(nn.Module):
    """An embedding and an LM head sharing one weight (as Marian's and GPT-2's), a scaled subclass
    of nn.Embedding (as BART's) for the positions: both ways into a weight at once."""

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.5

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.positions = self.ScaledEmbedding(16, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, input_ids, labels, attention_mask=None):
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = torch.tanh(self.mix(self.tokens(input_ids) + self.positions(positions)))
        logits = self.head(h)
        loss = F.cross_entropy(logits.flatten(0, 1), input_ids.roll(-1, dims=1).flatten())
        return type("Output", (), {"loss": loss})()


def test_a_weight_also_used_directly_gets_both_its_direct_and_its_lookups_terms():
    torch.manual_seed(0)
    model = _TiedLM()
    batches = [_batch(0, pad=False), _batch(2, rows=2, pad=False)]
    dense = _estimate_and_grads(model, batches, compact=False)
    compact = _estimate_and_grads(model, batches, compact=True)
    _assert_same(dense[0], compact[0])
    _assert_same(dense[1], compact[1])


class _Shapes(TorchDispatchMode):
    """Counts the tensors each op makes of a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        made = [o for o in outs if isinstance(o, torch.Tensor) and o.shape == self.shape]
        if made and not func._schema.is_mutable:  # made, not written in place
            self.count += len(made)
        return out


@pytest.mark.parametrize("compact", [False, True])
def test_only_the_steps_gradient_and_sum_are_vocabulary_sized(make_bert, compact):
    """Dense lookups make vocabulary-sized tensors in both backwards of every chunk; compacted
    ones make exactly two per step, whatever the chunk count: ``.grad`` and the estimate's sum."""
    vocab = 4096
    model = make_bert(vocab_size=vocab, seed=2)
    params = [p for p in model.parameters() if p.requires_grad]
    est = AdaHessian(params, lr=1e-3, seed=0).estimate()
    counter = _Shapes((vocab, model.config.hidden_size))
    for seed in range(3):  # three chunks of one step
        with double_backward_ready(model), \
                compact_lookups(model, est.params) if compact else contextlib.nullcontext() as lookups:
            loss = model(**_batch(seed)).loss
            with counter:
                est.accumulate(loss, rows=lookups.take() if compact else ())
    if compact:
        assert counter.count == 2
    else:
        assert counter.count >= 3 * 2


def test_lookups_without_grad_or_with_max_norm_stay_dense(make_bert):
    model = make_bert(vocab_size=VOCAB)
    params = list(model.parameters())
    with compact_lookups(model, params) as lookups:
        with torch.no_grad():
            model(**_batch(0))
        assert lookups.take() == []
        model(**_batch(0))
        taken = lookups.take()
    # word, position and token-type embeddings, each once, each holding only the rows it read
    assert len(taken) == 3
    assert taken[0].leaf.shape == (len(torch.unique(_batch(0)["input_ids"])), model.config.hidden_size)
    renormed = nn.Embedding(VOCAB, WIDTH, max_norm=1.0)
    with compact_lookups(renormed, list(renormed.parameters())) as lookups:
        renormed(torch.tensor([[1, 2, 2]]))
        assert lookups.take() == []


def test_hooks_are_gone_after_the_context(make_bert):
    model = make_bert(vocab_size=VOCAB)
    with compact_lookups(model, list(model.parameters())) as lookups:
        pass
    model(**_batch(0))
    assert lookups.take() == []
    assert not model.bert.embeddings.word_embeddings._forward_hooks
    assert not model.bert.embeddings.word_embeddings._forward_pre_hooks


def test_the_trainers_exact_pass_reads_lookups_through_row_leaves(make_bert):
    """``hessian_pass.exact_pass`` (what the trainer's exact micro-batches run in): a marked loss's
    backward gives the dense lookup's estimate and gradient, and makes only the step's two
    vocabulary-sized tensors."""
    from hf_adahessian.hessian_pass import exact_pass, mark

    vocab = 4096
    dense = make_bert(vocab_size=vocab, seed=4)
    expected = _estimate_and_grads(dense, [_batch(0)], compact=False)
    model = make_bert(vocab_size=vocab, seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    est = AdaHessian(params, lr=1e-3, seed=3).estimate()
    counter = _Shapes((vocab, model.config.hidden_size))
    with exact_pass(model, est):
        loss = model(**_batch(0)).loss
        with counter:
            mark(loss).backward()
    assert counter.count == 2
    _assert_same(expected[0], [s.clone() for s in est.filled()])
    _assert_same(expected[1], [p.grad for p in params])
