"""run_clm.py end to end: a causal LM from the package's builder, trained and evaluated on text files.

Plain text (a text per line) and one field of a JSON-lines column (Multi30k's
``translation.en``); perplexity and next-token accuracy in eval_results.json, AdaHessian's
counters in the logs, resumption from the output folder; bad input is one line, exit 2.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hf_adahessian.examples.models import build_model_folder
from script_helpers import RUN_EACH, _assert_usage_error, _json, _train_logs, _write_jsonl, adahessian, env  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_clm.py"
COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
          "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
WORDS = ["a man", "a dog", "two children", "a woman", "the team", "an old man"]
VERBS = ["runs", "plays football", "reads a book", "rides a bike", "sings", "walks home"]
LINES = [f"{w} {v} in the park ." for w in WORDS for v in VERBS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    (root / "train.txt").write_text("\n".join(LINES * 2) + "\n")
    (root / "valid.txt").write_text("\n".join(LINES[::3]) + "\n")
    _write_jsonl(root / "pairs.jsonl", [{"translation": {"de": "x", "en": line}} for line in LINES * 2])
    gpt2 = build_model_folder("gpt2", str(root / "gpt2"), LINES, size="tiny", vocab_size=300,
                              max_position_embeddings=64)
    return {"root": root, "gpt2": gpt2}


def run_clm(env, *args, check=True):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"run_clm.py exited with {result.returncode}:\n{result.stderr[-5000:]}")
    return result


def test_plain_text_train_eval_then_resume(files, env, tmp_path):
    out, root = tmp_path / "out", files["root"]
    args = ["--model_name_or_path", files["gpt2"], "--train_file", root / "train.txt", "--validation_file",
            root / "valid.txt", "--block_size", "16", "--do_train", "--do_eval", "--save_steps", "2",
            "--output_dir", out, *COMMON, *adahessian("hessian_interval=2")]
    run_clm(env, *args, "--max_steps", "4")
    results = _json(out / "eval_results.json")
    assert math.isfinite(results["perplexity"]) and results["perplexity"] == pytest.approx(
        math.exp(results["eval_loss"]), rel=1e-6)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert [h["hessian_updates"] for h in _train_logs(out)] == [1, 1, 2, 2]
    resumed = run_clm(env, *args, "--max_steps", "6")
    assert f"resuming training at {out / 'checkpoint-4'}" in resumed.stdout + resumed.stderr
    assert [h["step"] for h in _train_logs(out)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_one_field_of_a_json_lines_column_without_a_validation_file(files, env, tmp_path):
    out = tmp_path / "out"
    run_clm(env, "--model_name_or_path", files["gpt2"], "--train_file", files["root"] / "pairs.jsonl",
            "--text_column", "translation.en", "--block_size", "16", "--do_train", "--do_eval", "--max_steps", "2",
            "--validation_split_percentage", "20", "--output_dir", out, *COMMON, *adahessian())
    assert math.isfinite(_json(out / "eval_results.json")["perplexity"])


BAD_INPUT = {
    "no_data": ([], ["--train_file"]),
    "wrong_extension": (["--train_file", "corpus.parquet"], ["--train_file", "corpus.parquet", ".txt"]),
    "missing_file": (["--train_file", "absent.txt"], ["--train_file", "no such file"]),
    "text_column": (["--train_file", "pairs.jsonl", "--text_column", "text"], ["--text_column", "translation"]),
    "block_size": (["--train_file", "train.txt", "--block_size", "4096"], ["--block_size", "4096", "64"]),
}


def test_bad_input_is_one_line_and_exit_status_2(files, env, tmp_path):
    root = files["root"]
    (root / "corpus.parquet").write_text("x")
    cases = {name: ["--model_name_or_path", files["gpt2"], "--output_dir", str(tmp_path / name), "--do_train",
                    *COMMON, *[str(root / a) if a.endswith((".txt", ".jsonl", ".parquet")) else a for a in args]]
             for name, (args, _) in BAD_INPUT.items()}
    done = subprocess.run([sys.executable, "-c", RUN_EACH, str(SCRIPT), json.dumps(cases), str(tmp_path / "r.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (code, stderr) in _json(tmp_path / "r.json").items():
        _assert_usage_error(code, stderr, BAD_INPUT[name][1])


# ----------------------------------------------------------------------------- real data

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.slow
def test_multi30k_real_data_gpt2_adahessian_at_the_lm_recipe(env, tmp_path):
    """The LM benchmark's setting in small: a tiny GPT-2 from scratch on Multi30k's English side, the
    recipe's lr 0.3 with blocks of 32 (BENCHMARKS.md, language modelling)."""
    train, validation = SHARED_DATA / "multi30k" / "train.jsonl", SHARED_DATA / "multi30k" / "validation.jsonl"
    if not train.is_file() or not validation.is_file():
        pytest.skip(f"the Multi30k files are not at {SHARED_DATA / 'multi30k'} (they live beside the repository)")
    with open(train, encoding="utf-8") as f:
        texts = [json.loads(line)["translation"]["en"] for _, line in zip(range(3000), f)]
    vocab = 2000
    model = build_model_folder("gpt2", str(tmp_path / "gpt2"), texts, size="tiny", vocab_size=vocab)
    out = tmp_path / "out"
    run_clm(env, "--model_name_or_path", model, "--train_file", train, "--validation_file", validation,
            "--text_column", "translation.en", "--block_size", "64", "--max_train_samples", "2048",
            "--max_eval_samples", "256", "--do_train", "--do_eval", "--max_steps", "40",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--warmup_steps", "4",
            "--logging_steps", "5", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
            "--output_dir", out, "--optim", "adahessian", "--learning_rate", "0.3", "--optim_args", "block_size=32")
    results = _json(out / "eval_results.json")
    logs = _train_logs(out)
    assert logs[-1]["step"] == 40 and logs[-1]["hessian_updates"] == 40 and logs[-1]["skipped_hessian_updates"] == 0
    # From a random start (ln 2000 ≈ 7.6) the loss falls fast, and held-out text is far from uniform.
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0
    assert math.isfinite(results["perplexity"]) and results["perplexity"] < vocab / 4  # 332 measured
