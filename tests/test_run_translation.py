"""End-to-end runs of run_translation.py as a script: tiny Marian, T5 and BART built here, tiny data, a few steps."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hf_adahessian.examples.models import build_model_folder

from script_helpers import RUN_EACH, _assert_usage_error, _json, _train_logs, _write_jsonl, adahessian, env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_translation.py"
SHARED_DATA = REPO.parent / "shared" / "data"

PAIRS = [
    ("ein Hund läuft im Park", "a dog runs in the park"),
    ("die Katze sitzt auf der Matte", "the cat sits on the mat"),
    ("ein Mann steht auf einer Leiter", "a man stands on a ladder"),
    ("zwei Kinder spielen im Garten", "two children play in the garden"),
    ("eine Frau liest ein Buch", "a woman reads a book"),
    ("der Junge trinkt Wasser", "the boy drinks water"),
]

LANGS = ["--source_lang", "de", "--target_lang", "en"]
COMMON = [
    "--report_to", "none",
    "--use_cpu",
    "--seed", "0",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    # Tiny models have 128 positions; upstream's default of 1024 is refused.
    "--max_source_length", "32",
    "--max_target_length", "16",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("translation_data")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 16), ("validation", 8), ("test", 4)):
        rows = [{"translation": dict(zip(("de", "en"), rng.choice(PAIRS)))} for _ in range(n)]
        files[split] = _write_jsonl(root / f"{split}.jsonl", rows)
    return files


TEXTS = [text for pair in PAIRS for text in pair] * 4


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    return build_model_folder("marian", str(tmp_path_factory.mktemp("marian")), TEXTS, size="tiny", vocab_size=200)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return build_model_folder("t5", str(tmp_path_factory.mktemp("t5")), TEXTS, size="tiny", vocab_size=200)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return build_model_folder("bart", str(tmp_path_factory.mktemp("bart")), TEXTS, size="tiny", vocab_size=400)


def run_translation(env, *args, check=True):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"run_translation.py exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def _files(data, *splits):
    flags = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
    return [arg for split in splits for arg in (flags[split], data[split])]


def test_marian_adahessian_generate_then_resume_from_checkpoint(marian, data, env, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_translation(
        env, "--model_name_or_path", marian, *_files(data, "train", "validation", "test"),
        "--do_train", "--do_eval", "--do_predict", "--predict_with_generate", "--max_steps", "4",
        "--save_steps", "2", "--output_dir", first, *LANGS, *COMMON, *adahessian(),
    )  # fmt: skip
    for name in ("all_results.json", "eval_results.json", "predict_results.json", "train_results.json",
                 "trainer_state.json", "README.md", "generated_predictions.txt", "checkpoint-2",
                 "checkpoint-4"):  # fmt: skip
        assert (first / name).exists(), name
    results = _json(first / "eval_results.json")
    assert {"eval_bleu", "eval_gen_len", "eval_loss"} <= results.keys()
    assert 0.0 <= results["eval_bleu"] <= 100.0 and results["eval_samples"] == 8
    assert "predict_bleu" in _json(first / "predict_results.json")
    assert len((first / "generated_predictions.txt").read_text(encoding="utf-8").split("\n")) == 4
    assert [h["hessian_updates"] for h in _train_logs(first)] == [1, 2, 3, 4]

    # From checkpoint-2 into a fresh folder: steps 3 and 4 only, optimizer state (counters too) restored.
    run_translation(
        env, "--model_name_or_path", marian, *_files(data, "train"), "--do_train", "--max_steps", "4",
        "--resume_from_checkpoint", first / "checkpoint-2", "--output_dir", resumed, *LANGS, *COMMON, *adahessian(),
    )  # fmt: skip
    assert _json(resumed / "trainer_state.json")["global_step"] == 4
    logs = _train_logs(resumed)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["hessian_updates"] for h in logs] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in logs)


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_t5_source_prefix_adamw(t5, data, env, tmp_path):
    out = tmp_path / "out"
    result = run_translation(
        env, "--model_name_or_path", t5, *_files(data, "train", "validation", "test"),
        "--source_prefix", "translate German to English: ", "--do_train", "--do_eval", "--do_predict",
        "--predict_with_generate", "--max_steps", "3", "--output_dir", out, *LANGS, *COMMON,
        "--optim", "adamw_torch", "--learning_rate", "1e-3",
    )  # fmt: skip
    assert "didn't provide a source prefix" not in result.stdout + result.stderr
    results = _json(out / "eval_results.json")
    assert {"eval_bleu", "eval_gen_len"} <= results.keys()
    assert "hessian_updates" not in _train_logs(out)[0]  # the stock optimizer, untouched
    assert (out / "generated_predictions.txt").is_file()


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_bart_adahessian_beams_and_padding(bart, data, env, tmp_path):
    out = tmp_path / "out"
    run_translation(
        env, "--model_name_or_path", bart, *_files(data, "train", "validation"), "--do_train", "--do_eval",
        "--predict_with_generate", "--num_beams", "2", "--val_max_target_length", "8", "--pad_to_max_length", "true",
        "--max_steps", "3", "--output_dir", out, *LANGS, *COMMON, *adahessian("hessian_interval=2,hessian_power=0.5"),
    )  # fmt: skip
    results = _json(out / "eval_results.json")
    assert {"eval_bleu", "eval_gen_len"} <= results.keys()
    assert results["eval_gen_len"] <= 8
    assert [h["hessian_updates"] for h in _train_logs(out)] == [1, 1, 2]


# ----------------------------------------------------------------------------- bad input


def _bad_input_cases(data, root):
    """name -> (arguments, words the one-line message must name)."""
    no_field = _write_jsonl(root / "no_field.jsonl", [{"de": de, "en": en} for de, en in PAIRS])
    rows = [{"translation": {"de": de, "en": en}} for de, en in PAIRS[:2]] + [{"translation": {"de": "nur Deutsch"}}]
    holes = _write_jsonl(root / "holes.jsonl", rows)
    return {
        "language_not_in_data": (
            [*_files(data, "train"), "--source_lang", "fr", "--target_lang", "en"],
            ["--source_lang", "'fr'", "de, en"],
        ),
        "no_target_lang": ([*_files(data, "train"), "--source_lang", "de"], ["--target_lang"]),
        "no_data": (LANGS, ["--dataset_name", "--train_file"]),
        "wrong_extension": (["--train_file", root / "train.csv", *LANGS], ["--train_file", "train.csv", "json"]),
        "no_translation_field": (["--train_file", no_field, *LANGS], ["--train_file", "'translation'", "de"]),
        "row_without_language": (
            [*_files(data, "train"), "--validation_file", holes, *LANGS],
            ["--validation_file", "1 of 3 rows", "'en'"],
        ),
        "source_too_long": (
            [*_files(data, "train"), *LANGS, "--max_source_length", "4096"],
            ["--max_source_length", "128"],
        ),
        "bad_optim_args": (
            [*_files(data, "train"), *LANGS, *adahessian("hessian_power=3")],
            ["--optim_args", "hessian_power"],
        ),
    }


BAD_INPUT = ["language_not_in_data", "no_target_lang", "no_data", "wrong_extension", "no_translation_field",
             "row_without_language", "source_too_long", "bad_optim_args"]  # fmt: skip

REAL_PROCESS_CASE = "language_not_in_data"


@pytest.fixture(scope="module")
def bad_input_runs(marian, data, env, tmp_path_factory):
    """Every bad command line, each through the script's own `__main__` block.

    A fresh interpreter per case would spend ~5 s importing torch and transformers for a check that fails in
    milliseconds, so one child runs them all in turn (runpy, as `python run_translation.py` does) and one more case
    runs as a real process, to see the real exit status and the whole of stderr.
    """
    root = tmp_path_factory.mktemp("bad_input")
    specs = _bad_input_cases(data, root)
    assert sorted(specs) == sorted(BAD_INPUT)
    # The case's own flags come last: argparse keeps the last value, so they win over COMMON's.
    cases = {
        name: ["--model_name_or_path", marian, "--output_dir", str(root / name), "--do_train", *COMMON]
        + [str(arg) for arg in args]
        for name, (args, _) in specs.items()
    }
    in_one = subprocess.Popen(
        [sys.executable, "-c", RUN_EACH, str(SCRIPT), json.dumps(cases), str(root / "results.json")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    real = run_translation(env, *cases[REAL_PROCESS_CASE], check=False)
    _, stderr = in_one.communicate(timeout=600)
    assert in_one.returncode == 0, stderr[-3000:]
    results = _json(root / "results.json")
    per_case = {name: (code, err, specs[name][1]) for name, (code, err) in results.items()}
    return per_case, (real, specs[REAL_PROCESS_CASE][1])


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_status_2(bad_input_runs, name):
    _assert_usage_error(*bad_input_runs[0][name])


def test_bad_input_as_a_real_process(bad_input_runs):
    real, words = bad_input_runs[1]
    _assert_usage_error(real.returncode, real.stderr, words)


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_multi30k_real_data_marian_adahessian(env, tmp_path):
    train, validation = SHARED_DATA / "multi30k" / "train.jsonl", SHARED_DATA / "multi30k" / "validation.jsonl"
    if not train.is_file() or not validation.is_file():
        pytest.skip(f"the Multi30k files are not at {SHARED_DATA / 'multi30k'} (they live beside the repository)")
    texts = []
    with open(train, encoding="utf-8") as f:
        for _, line in zip(range(3000), f):
            texts += json.loads(line)["translation"].values()
    model = build_model_folder("marian", str(tmp_path / "marian"), texts, size="tiny", vocab_size=2000)
    out = tmp_path / "out"
    run_translation(
        env, "--model_name_or_path", model, "--train_file", train, "--validation_file", validation,
        "--do_train", "--do_eval", "--predict_with_generate", "--max_train_samples", "1024",
        "--max_eval_samples", "64", "--max_steps", "40", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32", "--source_lang", "de", "--target_lang", "en",
        "--max_source_length", "64", "--max_target_length", "64", "--val_max_target_length", "32",
        "--output_dir", out, "--report_to", "none", "--use_cpu", "--logging_steps", "5", "--disable_tqdm", "true",
        *adahessian(), "--warmup_steps", "4",
    )  # fmt: skip
    results = _json(out / "all_results.json")
    assert results["train_samples"] == 1024 and results["eval_samples"] == 64
    assert {"eval_bleu", "eval_gen_len"} <= results.keys()
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    logs = _train_logs(out)
    assert logs[-1]["step"] == 40 and logs[-1]["skipped_hessian_updates"] == 0
    # From a random start the loss falls fast (ln 2000 ≈ 7.6 at step 0).
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0
