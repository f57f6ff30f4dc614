"""Dropout masks drawn once per finite-difference step: a replayed pass is the pass drawing would give.

The replay must give the masks drawing gives, leave the RNG where drawing leaves it at every
point (so whatever else draws, in between or after, draws the same), draw nothing itself, and
draw as before from the first request that differs from what was kept.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_adahessian.dropout_masks import Masks


class Bernoullis(TorchDispatchMode):
    """Counts the ``bernoulli_`` kernels that run inside."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bernoulli_.float:
            self.count += 1
        return func(*args, **(kwargs or {}))


def a_pass(x, layers=3, p=0.3):
    """Dropout on activations of two shapes with the RNG drawn in between, as a model with noise of its own."""
    out = []
    for i in range(layers):
        out.append(F.dropout(x * (i + 1), p, training=True))
        out.append(torch.rand(3))
        out.append(F.dropout(x[:, :2], p / 2, training=True))
    return out


def kept(first):
    """``first`` run in a fork of the RNG with its masks kept: its input, the RNG state it started from, the masks."""
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    start = torch.get_rng_state()
    masks = Masks()
    with torch.random.fork_rng(devices=[]), masks.kept():
        first(x)
    return x, start, masks


def replayed_against_drawn(first, second):
    """``first`` kept in a fork of the RNG, then ``second`` replayed and ``second`` drawn from the same state:
    both outputs, both RNG states after, and the bernoulli_ kernels the replay ran."""
    x, start, masks = kept(first)
    with Bernoullis() as counted, masks.replayed():
        replayed = second(x)
    replayed_state = torch.get_rng_state()
    torch.set_rng_state(start)
    drawn = second(x)
    return replayed, drawn, replayed_state, torch.get_rng_state(), counted.count, masks


def test_a_replayed_pass_is_the_drawn_pass_and_leaves_the_rng_where_drawing_does():
    replayed, drawn, replayed_state, drawn_state, bernoullis, masks = replayed_against_drawn(a_pass, a_pass)
    for a, b in zip(replayed, drawn):
        assert torch.equal(a, b)
    assert torch.equal(replayed_state, drawn_state)
    assert bernoullis == 0 and masks.replayed_draws == 6


def test_a_pass_that_asks_for_other_masks_draws_them_from_where_drawing_would_be():
    """More layers, another probability, an extra mask first: the draws kept are replayed while they match,
    and from the first that does not, everything is drawn (even what matches a kept mask again)."""
    def extra_first(x):
        return [F.dropout(x[:1], 0.3, training=True)] + a_pass(x)

    for second in (lambda x: a_pass(x, layers=5), lambda x: a_pass(x, p=0.5), extra_first):
        replayed, drawn, replayed_state, drawn_state, bernoullis, masks = replayed_against_drawn(a_pass, second)
        for a, b in zip(replayed, drawn):
            assert torch.equal(a, b)
        assert torch.equal(replayed_state, drawn_state)
        assert bernoullis > 0


def test_masks_kept_for_more_than_one_replay_serve_each():
    x, start, masks = kept(a_pass)
    with torch.random.fork_rng(devices=[]), masks.replayed(last=False):
        first = a_pass(x)
    with masks.replayed():
        second = a_pass(x)
    torch.set_rng_state(start)
    drawn = a_pass(x)
    for a, b, c in zip(first, second, drawn):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert masks.replayed_draws == 12


def test_a_draw_on_a_generator_of_its_own_is_left_to_it():
    """Not the default generator's: neither kept nor replayed, so it draws its generator's next numbers."""
    def two_draws(gen, masks=None):
        first, second = torch.empty(4, 4), torch.empty(4, 4)
        with masks.kept() if masks else contextlib.nullcontext():
            first.bernoulli_(0.5, generator=gen)
        with masks.replayed() if masks else contextlib.nullcontext():
            second.bernoulli_(0.5, generator=gen)
        return first, second

    masks = Masks()
    kept_and_replayed = two_draws(torch.Generator().manual_seed(1), masks)
    drawn = two_draws(torch.Generator().manual_seed(1))
    assert masks.replayed_draws == 0
    assert torch.equal(kept_and_replayed[1], drawn[1]) and not torch.equal(drawn[0], drawn[1])
