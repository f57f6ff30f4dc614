"""hf_adahessian.examples.models: a local model folder that Auto classes load with no network.

Every model_type builds at size "tiny" from a few sentences, reloads with the
Auto classes, computes a finite loss; seq2seq models also generate, and their
tokenizer round-trips text. The command line runs once as a subprocess, its
errors in-process.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_adahessian import double_backward_ready
import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hf_adahessian.examples.models import (
    DECODER_TYPES,
    ENCODER_TYPES,
    MODEL_TYPES,
    SEQ2SEQ_TYPES,
    build_model_folder,
    main,
    read_texts,
)


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Made up for these tests, in the style of an image-caption corpus; the shared data stays in ../shared.
EN = [
    "A woman in a green coat is painting a fence.",
    "Two cats nap on a warm windowsill.",
    "A small boy carries a wooden boat to the pond.",
    "Several cooks in white aprons are stirring a huge soup pot.",
]
DE = [
    "Eine Frau in einem grünen Mantel streicht einen Zaun.",
    "Zwei Katzen schlafen auf einer warmen Fensterbank.",
    "Ein kleiner Junge trägt ein Holzboot zum Teich.",
    "Mehrere Köche in weißen Schürzen rühren einen riesigen Suppentopf.",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny folder per model_type, built once for the module."""
    root = tmp_path_factory.mktemp("models")
    return {t: build_model_folder(t, str(root / t), EN + DE, size="tiny", seed=0) for t in MODEL_TYPES}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_folder_holds_config_weights_and_tokenizer(folders, model_type):
    files = set(os.listdir(folders[model_type]))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert AutoConfig.from_pretrained(folders[model_type]).model_type == model_type


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_is_tiny(folders, model_type):
    config = AutoConfig.from_pretrained(folders[model_type])
    assert config.hidden_size <= 64  # d_model for seq2seq, through attribute_map
    assert config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    # A few sentences cannot fill the default 1000; the config follows the trained tokenizer.
    assert config.vocab_size == len(tokenizer) <= 1000


# --------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoders_are_causal_lms_with_tied_embeddings_and_learn(folders, model_type):
    """As upstream's GPT-2 and the small Llamas: the output embedding is the input one; a byte-level
    BPE tokenizer that pads with an end token; a few steps of AdaHessian lower the loss."""
    from transformers import AutoModelForCausalLM

    from hf_adahessian import AdaHessian

    model = AutoModelForCausalLM.from_pretrained(folders[model_type])
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    batch = tokenizer(EN, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0)
    # A short warm-up, as the recipes use: at the full lr the first step, on v̂ from one estimate, can overshoot.
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with double_backward_ready(model):
            loss = model(**batch, labels=labels).loss
            opt.estimate().accumulate(loss)
        opt.step()
        warmup.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_untied_decoder_on_request(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = build_model_folder("llama", str(tmp_path), EN, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_encoder_tokenizer_is_uncased_wordpiece_with_pairs(folders, model_type):
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    batch = tokenizer("Two CATS nap.", "Zwei Katzen.")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
    assert "cats" in tokens  # lowercased
    first_sep = tokens.index("[SEP]")
    assert batch["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id == 0
    assert tokenizer.decode(batch["input_ids"], skip_special_tokens=True) == "two cats nap. zwei katzen."


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_encoder_classifies_with_a_finite_loss(folders, model_type):
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    model = AutoModelForSequenceClassification.from_pretrained(folders[model_type])
    assert model.config.num_labels == 2
    batch = tokenizer(EN, DE, padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0, 1, 1, 0]))
    assert out.logits.shape == (4, 2)
    assert math.isfinite(out.loss.item())
    out.loss.backward()


def test_regression_head_for_stsb(tmp_path):
    folder = build_model_folder("bert", str(tmp_path), EN, num_labels=1)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    batch = AutoTokenizer.from_pretrained(folder)(EN, padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0.5, 1.0, 3.2, 4.8]))
    assert out.logits.shape == (4, 1) and math.isfinite(out.loss.item())


def test_masked_lm_task(tmp_path):
    folder = build_model_folder("bert", str(tmp_path), EN, task="masked-lm")
    model = AutoModelForMaskedLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(EN, padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert math.isfinite(out.loss.item())


# --------------------------------------------------------------------------- seq2seq


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_seq2seq_ids_agree_between_tokenizer_config_and_generation_config(folders, model_type):
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    model = AutoModelForSeq2SeqLM.from_pretrained(folders[model_type])
    config, gen = model.config, model.generation_config
    assert config.pad_token_id == gen.pad_token_id == tokenizer.pad_token_id
    assert config.eos_token_id == gen.eos_token_id == tokenizer.eos_token_id
    assert gen.forced_eos_token_id == tokenizer.eos_token_id
    assert config.decoder_start_token_id == gen.decoder_start_token_id
    # Each family starts decoding as its published checkpoints do.
    expected_start = {"marian": tokenizer.pad_token_id, "t5": tokenizer.pad_token_id, "bart": tokenizer.eos_token_id}
    assert config.decoder_start_token_id == expected_start[model_type]
    if model_type == "bart":
        assert gen.forced_bos_token_id == tokenizer.bos_token_id == config.bos_token_id


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_seq2seq_tokenizer_appends_eos_and_round_trips(folders, model_type):
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    batch = tokenizer(DE, text_target=EN)
    assert all(ids[-1] == tokenizer.eos_token_id for ids in batch["input_ids"] + batch["labels"])
    if model_type == "bart":
        assert all(ids[0] == tokenizer.bos_token_id for ids in batch["labels"])
    assert tokenizer.batch_decode(batch["labels"], skip_special_tokens=True) == EN
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == DE


@pytest.mark.parametrize("model_type", SEQ2SEQ_TYPES)
def test_seq2seq_trains_and_generates(folders, model_type):
    tokenizer = AutoTokenizer.from_pretrained(folders[model_type])
    model = AutoModelForSeq2SeqLM.from_pretrained(folders[model_type])
    batch = tokenizer(DE, text_target=EN, padding=True, return_tensors="pt")
    batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
    out = model(**batch)
    assert math.isfinite(out.loss.item())
    out.loss.backward()

    model.eval()
    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=12)
    assert generated.shape[0] == len(DE) and generated.shape[1] <= 12
    assert (generated[:, 0] == model.config.decoder_start_token_id).all()
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert len(texts) == len(DE) and all(isinstance(t, str) for t in texts)


def test_small_marian_has_the_benchmark_dimensions(tmp_path):
    config = AutoConfig.from_pretrained(build_model_folder("marian", str(tmp_path), EN + DE, size="small"))
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (256, 3, 3)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim) == (4, 1024)


def test_max_position_embeddings_reaches_config_and_tokenizer(tmp_path):
    folder = build_model_folder("bart", str(tmp_path), EN + DE, max_position_embeddings=64)
    assert AutoConfig.from_pretrained(folder).max_position_embeddings == 64
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 64


# --------------------------------------------------------------------------- seeds and errors


def _weights(folder):
    return AutoModelForSeq2SeqLM.from_pretrained(folder).state_dict()


def test_seed_fixes_the_initial_weights(tmp_path):
    a = _weights(build_model_folder("t5", str(tmp_path / "a"), EN + DE, seed=3))
    b = _weights(build_model_folder("t5", str(tmp_path / "b"), EN + DE, seed=3))
    c = _weights(build_model_folder("t5", str(tmp_path / "c"), EN + DE, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_model_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type 'gpt3'; valid: bert, squeezebert, marian, t5, bart, "
                                         "gpt2, llama"):
        build_model_folder("gpt3", str(tmp_path), EN)


def test_bad_size_task_or_text_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build_model_folder("bert", str(tmp_path), EN, size="huge")
    with pytest.raises(ValueError, match="does not fit"):
        build_model_folder("bert", str(tmp_path), EN, task="seq2seq-lm")
    with pytest.raises(ValueError, match="no text"):
        build_model_folder("bert", str(tmp_path), ["", "  "])
    with pytest.raises(TypeError):
        build_model_folder("bert", str(tmp_path), "one string")


# --------------------------------------------------------------------------- reading files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_read_texts_takes_every_language_of_a_translation(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"translation": {"de": d, "en": e}} for d, e in zip(DE, EN)])
    assert read_texts(path, "marian") == [s for pair in zip(DE, EN) for s in pair]
    assert read_texts(path, "marian", max_samples=1) == [DE[0], EN[0]]


def test_read_texts_skips_labels_and_ids_in_csv(tmp_path):
    path = tmp_path / "glue.csv"
    path.write_text("sentence1,sentence2,label,idx\nA man.,A woman.,1,0\nTwo dogs.,A cat.,0,1\n", encoding="utf-8")
    assert read_texts(str(path), "bert") == ["A man.", "A woman.", "Two dogs.", "A cat."]
    assert read_texts(str(path), "bert", text_columns=["sentence2"]) == ["A woman.", "A cat."]
    with pytest.raises(ValueError, match="no column 'sentence'"):
        read_texts(str(path), "bert", text_columns=["sentence"])


def test_read_texts_refuses_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file not found"):
        read_texts(str(tmp_path / "absent.jsonl"), "bert")
    (tmp_path / "data.parquet").write_text("hello\n")
    with pytest.raises(ValueError, match=r"\.txt, csv or JSON-lines"):
        read_texts(str(tmp_path / "data.parquet"), "bert")


def test_read_texts_reads_plain_text_a_line_at_a_time_and_one_field_of_a_dict_column(tmp_path):
    (tmp_path / "corpus.txt").write_text("A man.\n\nTwo dogs.\n", encoding="utf-8")
    assert read_texts(str(tmp_path / "corpus.txt"), "gpt2") == ["A man.", "Two dogs."]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"translation": {"de": d, "en": e}} for d, e in zip(DE, EN)])
    assert read_texts(path, "gpt2", text_columns=["translation.en"]) == EN


# --------------------------------------------------------------------------- command line


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "hf_adahessian.examples.models", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_builds_a_loadable_folder(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"translation": {"de": d, "en": e}} for d, e in zip(DE, EN)])
    out = tmp_path / "marian"
    proc = _cli("--model_type", "marian", "--train_file", train, "--output_dir", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stderr  # the build is logged
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.batch_decode(tokenizer(text_target=EN)["input_ids"], skip_special_tokens=True) == EN
    assert AutoModelForSeq2SeqLM.from_pretrained(out).config.model_type == "marian"


def test_cli_encoder_from_csv_columns(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\nA man.,0\nTwo dogs play.,1\nA cat sleeps.,2\n", encoding="utf-8")
    out = tmp_path / "squeezebert"
    main(["--model_type", "squeezebert", "--train_file", str(train), "--output_dir", str(out),
          "--text_columns", "sentence", "--num_labels", "3"])
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 3
    assert "dogs" in AutoTokenizer.from_pretrained(out).get_vocab()


def test_cli_bad_model_type_is_a_one_line_error(tmp_path):
    # sys.exit(message): Python prints the message alone on stderr, no traceback, status 1.
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_type", "gpt3", "--train_file", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == ("hf-adahessian-build-model: error: unknown model_type 'gpt3'; valid: bert, "
                                    "squeezebert, marian, t5, bart, gpt2, llama")


def test_cli_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="error: train_file not found: .*absent.csv"):
        main(["--model_type", "bert", "--train_file", str(tmp_path / "absent.csv"), "--output_dir", str(tmp_path)])


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_small_marian_from_multi30k(tmp_path):
    train = SHARED_DATA / "multi30k" / "train.jsonl"
    if not train.is_file():
        pytest.skip(f"real data absent: {train} (see ../shared/data/README.md)")
    folder = build_model_folder("marian", str(tmp_path), read_texts(str(train), "marian"), size="small")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert len(tokenizer) == model.config.vocab_size == 8000

    rows = [json.loads(line)["translation"] for line in (train.parent / "validation.jsonl").open(encoding="utf-8")]
    src, tgt = [r["de"] for r in rows[:200]], [r["en"] for r in rows[:200]]
    batch = tokenizer(src, text_target=tgt)
    # Unigram over both languages: no unknown pieces, and text comes back as it went in.
    assert tokenizer.unk_token_id not in {i for ids in batch["labels"] + batch["input_ids"] for i in ids}
    assert tokenizer.batch_decode(batch["labels"], skip_special_tokens=True) == tgt
    assert sum(len(ids) for ids in batch["labels"]) / len(tgt) < 25  # subwords, not characters

    inputs = tokenizer(src[:2], padding=True, return_tensors="pt")
    generated = model.generate(**inputs, max_length=10)
    assert len(tokenizer.batch_decode(generated, skip_special_tokens=True)) == 2
