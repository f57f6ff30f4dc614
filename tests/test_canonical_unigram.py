"""A trained Unigram tokenizer has one layout, however the trainer's hash maps iterated.

The trainer varies from training to training in one process (ids of tied pieces, the
characters' ladder of scores, last bits of the scores); the model folder must not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

from hf_adahessian.examples.canonical_unigram import LADDER_STEP, canonical_unigram
from hf_adahessian.examples.models import _train_seq2seq, read_texts

SPECIALS = ["<pad>", "</s>", "<unk>"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _corpus(seed: int = 0) -> list[str]:
    """Words of equal counts (tied scores), many rare characters (the ladder), sentences in many orders."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(60)]
    rare = list("äöüßéèêñçøåœæ")
    lines = []
    for i in range(300):
        line = [rng.choice(words) for _ in range(rng.randint(3, 9))]
        if i < len(rare):
            line.append("x" + rare[i])
        lines.append(" ".join(line))
    return lines


def _raw_unigram(texts: list[str], vocab_size: int = 80) -> Tokenizer:
    tok = Tokenizer(tokenizer_models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                          unk_token="<unk>", show_progress=False))
    return tok


def _vocab(tok: Tokenizer) -> list:
    return json.loads(tok.to_str())["model"]["vocab"]


def test_the_raw_trainer_varies_between_trainings_on_this_corpus():
    """What the canonical layout is for: without it, six trainings in one process do not agree."""
    texts = _corpus()
    layouts = {json.dumps(_vocab(_raw_unigram(texts))) for _ in range(6)}
    assert len(layouts) > 1


def test_trainings_agree_piece_for_piece_once_canonical():
    texts = _corpus()
    layouts = set()
    for _ in range(6):
        tok = _raw_unigram(texts)
        canonical_unigram(tok, SPECIALS)
        layouts.add(tok.to_str())
    assert len(layouts) == 1


def test_the_canonical_layout_keeps_the_specials_pieces_and_scores():
    """The same pieces and scores (to the rounding); specials at their ids; the others by decreasing
    score, ties by piece."""
    tok = _raw_unigram(_corpus())
    before = dict(_vocab(tok))
    canonical_unigram(tok, SPECIALS)
    after = _vocab(tok)
    assert [p for p, _ in after[:3]] == SPECIALS
    assert {p for p, _ in after} == set(before)
    assert all(abs(s - before[p]) <= 5e-7 for p, s in after)
    body = after[3:]
    assert body == sorted(body, key=lambda e: (-e[1], e[0]))
    assert json.loads(tok.to_str())["model"]["unk_id"] == 2
    assert [tok.token_to_id(p) for p in SPECIALS] == [0, 1, 2]
    assert [t["id"] for t in json.loads(tok.to_str())["added_tokens"]] == [0, 1, 2]


def _unigram(vocab: list) -> Tokenizer:
    return Tokenizer(tokenizer_models.Unigram([(p, 0.0) for p in SPECIALS] + vocab, unk_id=2))


def test_the_characters_ladder_goes_to_them_in_character_order():
    """The trainer gives characters no kept piece covers the lowest score plus 0, 1, 2... steps, in hash
    order: two such orders (with last-bit noise besides) give one layout, the ladder's scores going to
    its characters in character order.  A character with a score of its own, and a longer piece that
    happens to sit on the ladder, keep theirs."""
    low = -14.243152271943694
    genuine = [("▁the", -3.1), ("e", -4.25), ("▁a", -6.5), ("xy", low + 2 * LADDER_STEP), ("zz", low + 0.5)]
    ladders = (["Ü", "8", "&", "„"], ["&", "„", "Ü", "8"])
    layouts = []
    for order, noise in zip(ladders, (0.0, 3e-15)):
        ladder = [(c, low + k * LADDER_STEP + noise) for k, c in enumerate(order)]
        tok = _unigram(genuine + ladder)
        canonical_unigram(tok, SPECIALS)
        layouts.append(_vocab(tok))
    assert layouts[0] == layouts[1]
    scores = dict(layouts[0])
    characters = sorted(["Ü", "8", "&", "„"])
    assert [scores[c] for c in characters] == sorted((scores[c] for c in characters), reverse=True)
    assert scores[characters[-1]] == pytest.approx(low, abs=1e-6)
    assert scores["e"] == -4.25 and scores["xy"] == pytest.approx(low + 2 * LADDER_STEP, abs=1e-6)


def test_the_model_folders_seq2seq_tokenizer_is_the_same_every_build():
    """The builder's own path (Marian's and T5's tokenizer): three builds, one tokenizer."""
    texts = _corpus(1)
    built = {_train_seq2seq("marian", texts, 80)[0].to_str() for _ in range(3)}
    assert len(built) == 1


def test_a_model_other_than_unigram_or_specials_elsewhere_are_refused():
    with pytest.raises(ValueError, match="Unigram"):
        canonical_unigram(Tokenizer(tokenizer_models.BPE()), SPECIALS)
    moved = Tokenizer(tokenizer_models.Unigram([("<pad>", 0.0), ("a", -1.0), ("</s>", 0.0), ("<unk>", 0.0)], unk_id=3))
    with pytest.raises(ValueError, match="special tokens"):
        canonical_unigram(moved, SPECIALS)


@pytest.mark.slow
def test_multi30k_builds_agree_id_for_id():
    """The benchmark's tokenizer (8,000 pieces over both languages): two builds, one tokenizer (the raw
    trainer numbered 268 to 473 pieces differently from build to build)."""
    train = SHARED_DATA / "multi30k" / "train.jsonl"
    if not train.is_file():
        pytest.skip(f"real data absent: {train} (see ../shared/data/README.md)")
    texts = read_texts(str(train), "marian")
    assert _train_seq2seq("marian", texts, 8000)[0].to_str() == _train_seq2seq("marian", texts, 8000)[0].to_str()
