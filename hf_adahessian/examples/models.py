"""Build a local model folder (config, random weights, trained tokenizer).

No pretrained SqueezeBERT, Marian, T5 or GPT-2 checkpoint can be downloaded here, so
scripts train from scratch: this writes a folder that ``--model_name_or_path``
accepts, with a tokenizer trained by the ``tokenizers`` library on the data.

    hf-adahessian-build-model --model_type marian --size small \\
        --train_file ../shared/data/multi30k/train.jsonl --output_dir runs/marian-small
    hf-adahessian-build-model --model_type gpt2 --size small --train_file corpus.txt --output_dir runs/gpt2-small

Encoders (bert, squeezebert) get a WordPiece tokenizer and a classification (or
masked-LM) head; seq2seq models (marian, t5, bart) one tokenizer for both
languages; decoders (gpt2, llama) a byte-level BPE tokenizer and a causal-LM head
whose output embedding is tied to the input one, as GPT-2 and the small Llamas
(Llama 3.2 1B/3B) are upstream.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    HfArgumentParser,
    LlamaConfig,
    MarianConfig,
    SqueezeBertConfig,
    T5Config,
    TokenizersBackend,
)
from transformers.utils import logging as hf_logging

from .canonical_unigram import canonical_unigram


logger = logging.getLogger(__name__)

ENCODER_TYPES = ("bert", "squeezebert")
SEQ2SEQ_TYPES = ("marian", "t5", "bart")
DECODER_TYPES = ("gpt2", "llama")
MODEL_TYPES = ENCODER_TYPES + SEQ2SEQ_TYPES + DECODER_TYPES
SIZES = ("tiny", "small", "base")
TASKS = ("auto", "sequence-classification", "masked-lm", "seq2seq-lm", "causal-lm")

# hidden, layers (per stack), heads, feed-forward, positions, vocab.
# "small" fits 2 CPU cores (BERT-mini; a 3+3-layer Marian), "base" is the published base size.
_SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=2, ffn=64, positions=128, vocab=1000),
    "small": dict(hidden=256, layers=4, heads=4, ffn=1024, positions=512, vocab=8000),
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072, positions=512, vocab=30522),
}
_SEQ2SEQ_SMALL = dict(hidden=256, layers=3, heads=4, ffn=1024, positions=512, vocab=8000)
_BASE = {
    "squeezebert": dict(vocab=30528),  # squeezebert/squeezebert-uncased
    "marian": dict(hidden=512, layers=6, heads=8, ffn=2048, positions=512, vocab=32000),  # opus-mt
    "t5": dict(hidden=768, layers=12, heads=12, ffn=3072, positions=512, vocab=32000),  # t5-base, without extra ids
    "bart": dict(hidden=768, layers=6, heads=12, ffn=3072, positions=1024, vocab=50265),  # bart-base
    "gpt2": dict(hidden=768, layers=12, heads=12, ffn=3072, positions=1024, vocab=50257),  # gpt2 (124M)
    "llama": dict(hidden=2048, layers=16, heads=32, ffn=8192, positions=2048, vocab=32000),  # ~Llama 3.2 1B shape
}


def _dims(model_type: str, size: str) -> dict:
    dims = dict(_SIZES[size])
    if size == "small" and model_type in SEQ2SEQ_TYPES:
        dims.update(_SEQ2SEQ_SMALL)
    if size == "base":
        dims.update(_BASE.get(model_type, {}))
    return dims


# ----------------------------------------------------------------------------- tokenizers


def _template(tok: Tokenizer, single: str, pair: str, tokens: list[str]) -> None:
    """Where the special tokens go around one text and a pair."""
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in tokens])


def _byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str], unk: str | None = None) -> Tokenizer:
    """Byte-level BPE, as GPT-2, RoBERTa and BART: no unknown characters."""
    tok = Tokenizer(tokenizer_models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _train_wordpiece(texts: list[str], vocab_size: int) -> tuple[Tokenizer, dict]:
    """An uncased BERT tokenizer: [CLS] A [SEP] (B [SEP]) with token types."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(tokenizer_models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    _template(tok, "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"])
    names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    # The generic tokenizer class returns no token_type_ids unless told to; BERT wants them.
    names["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return tok, names


def _train_seq2seq(model_type: str, texts: list[str], vocab_size: int) -> tuple[Tokenizer, dict]:
    """One tokenizer for both languages, laid out as the real checkpoints lay theirs out."""
    if model_type == "bart":
        # As RoBERTa/BART: <s> A </s>.
        tok = _byte_level_bpe(texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk="<unk>")
        _template(tok, "<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "</s>"])
        return tok, dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")

    # SentencePiece-style unigram as Marian and T5: pad 0, </s> 1, <unk> 2, A </s>.
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(tokenizer_models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(texts, trainer)
    canonical_unigram(tok, specials)  # the trainer's ids and last bits change from one training to the next
    # T5 closes each segment; Marian closes the whole input only.
    _template(tok, "$A </s>", "$A </s> $B </s>" if model_type == "t5" else "$A $B </s>", ["</s>"])
    return tok, dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _train_byte_level_bpe(model_type: str, texts: list[str], vocab_size: int) -> tuple[Tokenizer, dict]:
    """GPT-2's byte-level BPE; Llama-style adds <s> before each text."""
    if model_type == "gpt2":
        tok = _byte_level_bpe(texts, vocab_size, ["<|endoftext|>"])
        # GPT-2 has no padding token; like most fine-tuning recipes, pad with end-of-text.
        return tok, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    tok = _byte_level_bpe(texts, vocab_size, ["<unk>", "<s>", "</s>"])
    _template(tok, "<s> $A", "<s> $A <s> $B", ["<s>"])
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


# ----------------------------------------------------------------------------- configs


def _decoder_config(model_type: str, d: dict, vocab: int, ids: dict, tie: bool):
    if model_type == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=d["positions"], n_embd=d["hidden"], n_layer=d["layers"],
                          n_head=d["heads"], n_inner=d["ffn"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                          pad_token_id=ids["pad"], tie_word_embeddings=tie)
    return LlamaConfig(vocab_size=vocab, hidden_size=d["hidden"], intermediate_size=d["ffn"],
                       num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                       num_key_value_heads=max(1, d["heads"] // 4) if d["heads"] % 4 == 0 else d["heads"],
                       max_position_embeddings=d["positions"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                       pad_token_id=ids["pad"], tie_word_embeddings=tie)


def _encoder_config(model_type: str, d: dict, vocab: int, pad_id: int, num_labels: int):
    common = dict(vocab_size=vocab, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                  num_attention_heads=d["heads"], intermediate_size=d["ffn"],
                  max_position_embeddings=d["positions"], pad_token_id=pad_id, num_labels=num_labels)
    if model_type == "squeezebert":
        # SqueezeBERT's encoder has no projection from embedding to hidden size.
        return SqueezeBertConfig(embedding_size=d["hidden"], **common)
    return BertConfig(**common)


def _seq2seq_config(model_type: str, d: dict, vocab: int, ids: dict):
    if model_type == "t5":
        return T5Config(vocab_size=vocab, d_model=d["hidden"], d_kv=d["hidden"] // d["heads"], d_ff=d["ffn"],
                        num_layers=d["layers"], num_decoder_layers=d["layers"], num_heads=d["heads"],
                        pad_token_id=ids["pad"], eos_token_id=ids["eos"], decoder_start_token_id=ids["pad"])
    common = dict(vocab_size=vocab, d_model=d["hidden"], encoder_layers=d["layers"], decoder_layers=d["layers"],
                  encoder_attention_heads=d["heads"], decoder_attention_heads=d["heads"],
                  encoder_ffn_dim=d["ffn"], decoder_ffn_dim=d["ffn"], max_position_embeddings=d["positions"],
                  pad_token_id=ids["pad"], eos_token_id=ids["eos"], forced_eos_token_id=ids["eos"])
    if model_type == "marian":
        # opus-mt settings; Marian starts decoding from <pad>.
        return MarianConfig(
            decoder_start_token_id=ids["pad"], activation_function="swish", scale_embedding=True, **common
        )
    # BART starts from </s> and then forces <s>, matching labels "<s> ... </s>" shifted right.
    return BartConfig(bos_token_id=ids["bos"], decoder_start_token_id=ids["eos"], **common)


def _generation_config(model_type: str, config, ids: dict, positions: int) -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=ids.get("bos"),
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        forced_eos_token_id=ids["eos"],
        forced_bos_token_id=ids["bos"] if model_type == "bart" else None,
        # Scripts pass their own --generation_max_length; this only keeps a bare generate() sensible.
        max_length=min(128, positions),
    )


# ----------------------------------------------------------------------------- public API


def build_model_folder(
    model_type: str,
    output_dir: str,
    texts: Iterable[str],
    size: str = "tiny",
    vocab_size: int | None = None,
    task: str = "auto",
    num_labels: int = 2,
    seed: int = 0,
    max_position_embeddings: int | None = None,
    tie_word_embeddings: bool = True,
) -> str:
    """Train a tokenizer on ``texts``, initialise a model at random and save both to ``output_dir``.

    Args:
        model_type: "bert" or "squeezebert" (encoders, WordPiece tokenizer); "marian", "t5",
            "bart" (seq2seq, one tokenizer shared by both languages); "gpt2" or "llama"
            (decoders, byte-level BPE).
        output_dir: the folder to write; ``from_pretrained(output_dir)`` loads it.
        texts: training text for the tokenizer; for seq2seq, both sides.
        size: "tiny" (tests), "small" (CPU benchmarks) or "base" (published base sizes).
        vocab_size: tokenizer vocabulary to aim for (the trained one may be smaller
            on little text); defaults to the size's vocabulary.
        task: "auto" (sequence classification for encoders, seq2seq LM for seq2seq models,
            causal LM for decoders), "sequence-classification", "masked-lm", "seq2seq-lm"
            or "causal-lm".
        num_labels: classes of the classification head (1 for regression).
        seed: seeds the weight initialisation.
        max_position_embeddings: longest input; defaults to the size's.
        tie_word_embeddings: decoders only: share the input and output embedding.

    Returns:
        ``output_dir``.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    kind = "encoder" if model_type in ENCODER_TYPES else "seq2seq" if model_type in SEQ2SEQ_TYPES else "decoder"
    if task == "auto":
        task = {"encoder": "sequence-classification", "seq2seq": "seq2seq-lm", "decoder": "causal-lm"}[kind]
    fits = {"encoder": ("sequence-classification", "masked-lm"), "seq2seq": ("seq2seq-lm",),
            "decoder": ("causal-lm",)}[kind]
    if task not in fits:
        raise ValueError(f"task {task!r} does not fit model_type {model_type!r} (use {' or '.join(fits)})")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no text to train the tokenizer on")

    d = _dims(model_type, size)
    if max_position_embeddings is not None:
        d["positions"] = max_position_embeddings
    target_vocab = vocab_size or d["vocab"]

    if kind == "encoder":
        tok, names = _train_wordpiece(texts, target_vocab)
    elif kind == "seq2seq":
        tok, names = _train_seq2seq(model_type, texts, target_vocab)
    else:
        tok, names = _train_byte_level_bpe(model_type, texts, target_vocab)
    # TokenizersBackend is 5.x's PreTrainedTokenizerFast: it saves tokenizer.json as is,
    # so AutoTokenizer reloads exactly this pipeline whatever the model_type maps to.
    tokenizer = TokenizersBackend(
        tokenizer_object=tok, model_max_length=d["positions"], clean_up_tokenization_spaces=False, **names
    )
    vocab = len(tokenizer)
    ids = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}

    # Seed the initialisation without moving the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "encoder":
            config = _encoder_config(model_type, d, vocab, tokenizer.pad_token_id, num_labels)
            auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForMaskedLM
            model = auto.from_config(config)
        elif kind == "seq2seq":
            config = _seq2seq_config(model_type, d, vocab, ids)
            model = AutoModelForSeq2SeqLM.from_config(config)
            model.generation_config = _generation_config(model_type, config, ids, d["positions"])
        else:
            config = _decoder_config(model_type, d, vocab, ids, tie_word_embeddings)
            model = AutoModelForCausalLM.from_config(config)

    if os.path.isdir(output_dir) and os.listdir(output_dir):
        logger.warning("%s is not empty: its config, weights and tokenizer files are overwritten", output_dir)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built %s (%s, %s) in %s: %s parameters, vocab %d (asked %d), trained on %d texts",
        model_type, size, task, output_dir, f"{n_params:,}", vocab, target_vocab, len(texts),
    )
    return output_dir


def read_texts(path: str, model_type: str, text_columns: list[str] | None = None, max_samples: int | None = None):
    """The tokenizer's training text from a .txt (a text per line), csv or JSON-lines file.

    ``text_columns`` picks columns (``translation.en``: one field of a dict column; a dict
    column itself gives all its fields); otherwise a ``translation`` dict gives all its
    languages (seq2seq), and failing that every column holding non-numeric text.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train_file not found: {path}")
    rows = _read_rows(path)
    texts = []
    for i, row in enumerate(rows):
        if max_samples is not None and i >= max_samples:
            break
        if text_columns:
            missing = [c for c in text_columns if c.partition(".")[0] not in row]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r} (has {', '.join(row)})")
            for c in text_columns:
                column, _, key = c.partition(".")
                value = row[column][key] if key else row[column]
                if isinstance(value, dict):  # Multi30k's translation: all its texts
                    texts.extend(v for v in value.values() if isinstance(v, str))
                elif value is not None:
                    texts.append(str(value))
        elif model_type in SEQ2SEQ_TYPES and isinstance(row.get("translation"), dict):
            texts.extend(v for v in row["translation"].values() if isinstance(v, str))
        else:
            texts.extend(v for v in row.values() if _is_text(v))
    if not texts:
        raise ValueError(f"{path}: no text found (use --text_columns)")
    return texts


def _read_rows(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        # Plain text, as run_clm reads it: one text per non-empty line.
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}
        return
    if ext in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
    elif ext in (".json", ".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: not JSON lines ({err.msg})") from None
    else:
        raise ValueError(f"train_file must be a .txt, csv or JSON-lines file, got {path}")


def _is_text(value) -> bool:
    # csv gives labels and ids as strings too; they are not text to learn from.
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


# ----------------------------------------------------------------------------- command line


@dataclass
class BuildModelArguments:
    """Arguments of ``hf-adahessian-build-model``."""

    model_type: str = field(metadata={"help": f"One of: {', '.join(MODEL_TYPES)}."})
    train_file: str = field(metadata={"help": ".txt (a text per line), csv or JSON-lines file whose text trains "
                                              "the tokenizer."})
    output_dir: str = field(metadata={"help": "Folder to write (config, weights, tokenizer)."})
    size: str = field(default="tiny", metadata={"help": f"One of: {', '.join(SIZES)}."})
    vocab_size: int | None = field(default=None, metadata={"help": "Tokenizer vocabulary to aim for; unset: by size."})
    task: str = field(default="auto", metadata={"help": f"One of: {', '.join(TASKS)}."})
    num_labels: int = field(default=2, metadata={"help": "Classes of the classification head (1: regression)."})
    text_columns: str | None = field(
        default=None,
        metadata={"help": "Comma-separated text columns; unset: `translation` for seq2seq, else every text column."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Read only the first N rows."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Longest input; unset: by size."})
    seed: int = field(default=0, metadata={"help": "Seed of the weight initialisation."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Decoders: share input and output embedding."})


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``hf-adahessian-build-model`` / ``python -m hf_adahessian.examples.models``."""
    parser = HfArgumentParser(
        BuildModelArguments,
        prog="hf-adahessian-build-model",
        description="Build a model folder (config, random weights, tokenizer trained on --train_file).",
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    try:
        if args.model_type not in MODEL_TYPES:  # fail before reading a large file
            raise ValueError(f"unknown model_type {args.model_type!r}; valid: {', '.join(MODEL_TYPES)}")
        columns = [c.strip() for c in args.text_columns.split(",") if c.strip()] if args.text_columns else None
        texts = read_texts(args.train_file, args.model_type, columns, args.max_train_samples)
        build_model_folder(
            args.model_type,
            args.output_dir,
            texts,
            size=args.size,
            vocab_size=args.vocab_size,
            task=args.task,
            num_labels=args.num_labels,
            seed=args.seed,
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=args.tie_word_embeddings,
        )
    except (ValueError, OSError) as err:
        sys.exit(f"{parser.prog}: error: {err}")


if __name__ == "__main__":
    main()
