"""One layout for a trained Unigram model, whatever order the trainer's hash maps iterated in.

`tokenizers`' Unigram trainer (Marian's and T5's tokenizer here) is not deterministic, even
in one process on one thread: it counts words in a hash map with per-process random keys,
so its EM sums run in a different order each training and the scores differ in their last
bits; pieces with equal scores take their ids in hash order; and each character of the text
that no kept piece covers gets the lowest score plus 0, 1e-4, 2e-4, ... in hash order too.
Two builds of one model folder then number the same pieces differently (on Multi30k, 268 to
473 of 8,000 ids), and the same seed trains on different token ids.

:func:`canonical_unigram` rounds the scores below those last bits, gives that ladder of
scores to its characters in character order, and sorts the pieces by score, ties by piece,
behind the special tokens.  What it cannot undo, the trainer keeping another set of pieces
where two pieces' pruning losses tie to the last bit, has not been seen on Multi30k.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from tokenizers import models as tokenizer_models

__all__ = ["canonical_unigram", "SCORE_DECIMALS", "LADDER_STEP"]

# Scores are log-probabilities of order -1 to -20, their last-bit differences about 2e-15: rounded
# to 1e-6 they straddle a rounding boundary with odds of about 2e-9 a piece (1e-5 for a model of
# 8,000), and scores 1e-6 apart are pieces whose counts differ by a millionth, which may tie.
SCORE_DECIMALS = 6
# The trainer's step between the scores it gives characters no kept piece covers.
LADDER_STEP = 1e-4


def _ladder(scores: dict[str, float]) -> list[str]:
    """The single characters whose score is the lowest score plus a whole number of ladder steps.

    The ladder starts at the trained model's lowest score, which no kept piece undercuts, so
    it starts at the lowest score here; a character with a score of its own that falls on the
    ladder (a tie at the lowest score, typically) is taken with it, which costs nothing: the
    multiset of scores handed back is the same.
    """
    low = min(scores.values())
    tolerance = 2 * 10.0**-SCORE_DECIMALS  # the two ends of a step, each rounded
    characters = {piece: score for piece, score in scores.items() if len(piece) == 1}
    picked = []
    for piece, score in characters.items():
        steps = (score - low) / LADDER_STEP
        # No longer than one step per character: a frequent character far above is never taken.
        if round(steps) < len(characters) and abs(steps - round(steps)) * LADDER_STEP < tolerance:
            picked.append(piece)
    return picked


def canonical_unigram(tok: Tokenizer, specials: list[str]) -> None:
    """Replace ``tok``'s trained Unigram model by its canonical layout, in place.

    ``specials`` keep their ids (the trainer puts them first); the other pieces follow by
    decreasing rounded score, ties in piece order.
    """
    state = json.loads(tok.to_str())["model"]
    if state.get("type") != "Unigram":
        raise ValueError(f"canonical_unigram needs a Unigram model, got {state.get('type')!r}")
    vocab = [(piece, float(score)) for piece, score in state["vocab"]]
    head = vocab[: len(specials)]
    if [piece for piece, _ in head] != list(specials):
        # The added tokens hold these ids: a layout that moved them would break the tokenizer.
        raise ValueError(f"canonical_unigram expects the special tokens {specials} first, in that order; "
                         f"the trained model starts {[piece for piece, _ in head]}")
    scores = {piece: round(score, SCORE_DECIMALS) for piece, score in vocab if piece not in specials}
    ladder = sorted(_ladder(scores))
    for piece, score in zip(ladder, sorted((scores[p] for p in ladder), reverse=True)):
        scores[piece] = score
    body = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    pieces = [piece for piece, _ in head] + [piece for piece, _ in body]
    unk = state.get("unk_id")
    unk_id = None if unk is None else pieces.index(vocab[unk][0])
    tok.model = tokenizer_models.Unigram(head + body, unk_id=unk_id, byte_fallback=state.get("byte_fallback", False))
