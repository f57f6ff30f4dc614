"""End-to-end runs of run_glue.py as a script: tiny models built locally, tiny data files, a few steps."""

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
SCRIPT = REPO / "run_glue.py"
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = "good bad great awful fine nice terrible lovely boring fun dull bright the a film plot was is".split()

# One short line per flag keeps the runs cheap; each test adds what it checks.
COMMON = [
    "--report_to", "none",
    "--use_cpu",
    "--seed", "0",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--max_seq_length", "32",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]


def _sentence(rng):
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """sst2-, mrpc- and stsb-shaped files, as GLUE's own columns."""
    root = tmp_path_factory.mktemp("glue_data")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 32), ("validation", 16), ("test", 8)):
        sst2 = [{"sentence": _sentence(rng), "label": rng.randint(0, 1), "idx": i} for i in range(n)]
        if split == "validation":
            for row in sst2:
                row["label"] = ("negative", "positive")[row["label"]]  # labels by name, as some exports write them
        if split == "test":
            for row in sst2:
                row["label"] = -1  # as GLUE's hidden test labels
        files["sst2", split] = _write_jsonl(root / f"sst2_{split}.jsonl", sst2)
        mrpc = [
            {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": rng.randint(0, 1), "idx": i}
            for i in range(n)
        ]
        files["mrpc", split] = _write_jsonl(root / f"mrpc_{split}.jsonl", mrpc)
        stsb = [
            {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": round(rng.uniform(0, 5), 2)}
            for i in range(n)
        ]
        if split == "test":
            for row in stsb:
                del row["label"]  # an unlabelled test file
        files["stsb", split] = _write_csv(root / f"stsb_{split}.csv", stsb)
    return files


def _texts(data):
    texts = []
    for path in data.values():
        if str(path).endswith(".jsonl"):
            for line in open(path, encoding="utf-8"):
                row = json.loads(line)
                texts += [v for k, v in row.items() if k.startswith("sentence") and isinstance(v, str)]
    return texts


@pytest.fixture(scope="module")
def bert(tmp_path_factory, data):
    return build_model_folder("bert", str(tmp_path_factory.mktemp("bert")), _texts(data), size="tiny")


@pytest.fixture(scope="module")
def squeezebert(tmp_path_factory, data):
    return build_model_folder("squeezebert", str(tmp_path_factory.mktemp("squeezebert")), _texts(data), size="tiny")


def run_glue(env, *args, check=True):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(f"run_glue.py exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def test_sst2_adahessian_train_eval_predict_then_resume(bert, data, env, tmp_path):
    out = tmp_path / "out"
    files = ["--train_file", data["sst2", "train"], "--validation_file", data["sst2", "validation"]]
    first = run_glue(
        env, "--model_name_or_path", bert, "--task_name", "sst2", *files, "--test_file", data["sst2", "test"],
        "--do_train", "--do_eval", "--do_predict", "--max_steps", "4", "--save_steps", "2",
        "--output_dir", out, *COMMON, *adahessian(),
    )  # fmt: skip
    # The library's own lines reach the script's log: the chunking chosen and the end-of-training summary.
    assert "hessian_chunks=auto: the exact estimator's micro-batches of 16 rows or more in 4 chunks" in first.stdout
    assert "AdaHessian: 4 optimizer steps, 4 Hessian estimates" in first.stdout
    for name in ("all_results.json", "eval_results.json", "train_results.json", "trainer_state.json", "README.md",
                 "config.json", "model.safetensors", "tokenizer.json", "checkpoint-2", "checkpoint-4"):  # fmt: skip
        assert (out / name).exists(), name
    results = _json(out / "all_results.json")
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert results["eval_samples"] == 16 and results["train_samples"] == 32
    assert math.isfinite(results["train_loss"])
    logs = _train_logs(out)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert [h["hessian_updates"] for h in logs] == [1, 2, 3, 4]  # AdaHessian trained, a Hessian every step
    lines = (out / "predict_results_sst2.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 8
    assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}

    # A kill while checkpoint-5 was being written leaves a folder with the model's config and half an
    # optimizer.pt, and no trainer_state.json (the Trainer writes it last).
    partial = out / "checkpoint-5"
    partial.mkdir()
    (partial / "config.json").write_text((out / "checkpoint-4" / "config.json").read_text())
    (partial / "optimizer.pt").write_bytes((out / "checkpoint-4" / "optimizer.pt").read_bytes()[:1000])

    # Same output_dir, more steps: the script skips the partial folder, says so, finds checkpoint-4
    # itself and carries on from there.
    resumed = run_glue(
        env, "--model_name_or_path", bert, "--task_name", "sst2", *files, "--do_train", "--max_steps", "6",
        "--save_steps", "2", "--output_dir", out, *COMMON, *adahessian(),
    )  # fmt: skip
    printed = resumed.stdout + resumed.stderr
    assert f"Skipping {partial}: it is incomplete" in printed
    assert f"Checkpoint detected, resuming training at {out / 'checkpoint-4'}" in printed
    state = _json(out / "trainer_state.json")
    assert state["global_step"] == 6
    logs = _train_logs(out)
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5, 6]
    # The optimizer's own state came back from the checkpoint too, counters included.
    assert [h["hessian_updates"] for h in logs] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6").is_dir()


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_use_peft_trains_lora_adapters_and_the_head_with_adahessian(bert, data, env, tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install 'hf-adahessian[peft]')")
    out = tmp_path / "out"
    run_glue(
        env, "--model_name_or_path", bert, "--task_name", "sst2", "--train_file", data["sst2", "train"],
        "--validation_file", data["sst2", "validation"], "--do_train", "--do_eval", "--max_steps", "3",
        "--output_dir", out, *COMMON, *adahessian(), "--use_peft", "--lora_r", "4", "--lora_target_modules", "query",
        "value",
    )  # fmt: skip
    config = _json(out / "adapter_config.json")
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["task_type"] == "SEQ_CLS"
    # What was saved is the adapter (and the head peft keeps beside it), not a whole model.
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert not any("encoder.layer.0.attention.self.key" in n for n in names)  # frozen base, not saved
    assert [h["hessian_updates"] for h in _train_logs(out)] == [1, 2, 3]
    assert 0.0 <= _json(out / "eval_results.json")["eval_accuracy"] <= 1.0


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_mrpc_sentence_pairs_squeezebert_adahessian(squeezebert, data, env, tmp_path):
    out = tmp_path / "out"
    run_glue(
        env, "--model_name_or_path", squeezebert, "--task_name", "mrpc", "--train_file", data["mrpc", "train"],
        "--validation_file", data["mrpc", "validation"], "--do_train", "--do_eval", "--max_steps", "4",
        "--output_dir", out, *COMMON, *adahessian("hessian_interval=2,hessian_power=0.5"),
    )  # fmt: skip
    assert _json(out / "trainer_state.json")["global_step"] == 4
    # hessian_interval=2: a Hessian at steps 1 and 3 only.
    assert [h["hessian_updates"] for h in _train_logs(out)] == [1, 1, 2, 2]
    results = _json(out / "eval_results.json")
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= results.keys()
    assert results["eval_combined_score"] == pytest.approx((results["eval_accuracy"] + results["eval_f1"]) / 2)


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_stsb_regression_csv_adamw(bert, data, env, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)  # not a usable checkpoint: resuming from it would fail
    run_glue(
        env, "--model_name_or_path", bert, "--task_name", "stsb", "--train_file", data["stsb", "train"],
        "--validation_file", data["stsb", "validation"], "--test_file", data["stsb", "test"],
        "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--output_dir", out, "--overwrite_output_dir",
        # The saved head has 2 classes; STS-B wants 1 output.
        "--ignore_mismatched_sizes", *COMMON, "--optim", "adamw_torch", "--learning_rate", "1e-3",
        "--pad_to_max_length", "false",
    )  # fmt: skip
    results = _json(out / "eval_results.json")
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= results.keys()
    assert "hessian_updates" not in _train_logs(out)[0]  # the stock optimizer, untouched
    assert len(_json(out / "config.json")["id2label"]) == 1
    lines = (out / "predict_results_stsb.txt").read_text().splitlines()
    assert len(lines) == 1 + 8
    float(lines[1].split("\t")[1])


@pytest.mark.slow  # a variant end to end: the slow suite (CI runs it), see setup.cfg
def test_plain_files_without_task_use_upstream_defaults(bert, data, env, tmp_path):
    # No --task_name: the 'label' column, the text columns found, sorted label values, accuracy.
    out = tmp_path / "out"
    run_glue(
        env, "--model_name_or_path", bert, "--train_file", data["mrpc", "train"],
        "--validation_file", data["mrpc", "validation"], "--do_eval", "--output_dir", out, *COMMON,
    )  # fmt: skip
    results = _json(out / "eval_results.json")
    assert "eval_accuracy" in results and "eval_f1" not in results
    assert results["eval_samples"] == 16


# ----------------------------------------------------------------------------- bad input


def _bad_input_cases(data, root):
    """name -> (arguments, words the one-line message must name)."""
    train = ["--train_file", data["sst2", "train"]]
    validation = ["--validation_file", data["sst2", "validation"]]
    rows = [json.loads(line) for line in open(data["sst2", "train"], encoding="utf-8")]
    rows[3]["label"] = 7
    bad_label = _write_jsonl(root / "bad_label.jsonl", rows)
    pairs = [{"sentence1": "a b", "sentence2": "c d", "label": 1}] * 3
    holes = _write_csv(root / "holes.csv", [*pairs, {"sentence1": "a b", "sentence2": "", "label": 0}])
    # What an AdamW run saves: an optimizer state with no AdaHessian part.
    adamw_checkpoint = root / "saved_by_adamw"
    adamw_checkpoint.mkdir(exist_ok=True)
    import torch

    torch.save({"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}]}, adamw_checkpoint / "optimizer.pt")
    return {
        "unknown_task": (["--task_name", "glue9", *train, *validation], ["--task_name", "glue9", "mrpc, qnli"]),
        "no_data": ([], ["--task_name", "--dataset_name", "--train_file"]),
        "wrong_extension": (
            ["--train_file", root / "train.txt", "--validation_file", root / "valid.txt"],
            ["--train_file", "train.txt", ".csv"],
        ),
        "missing_file": (
            ["--task_name", "sst2", "--train_file", root / "nowhere.jsonl"],
            ["--train_file", "no such file"],
        ),
        "missing_text_column": (["--task_name", "mrpc", *train, *validation], ["--train_file", "sentence1", "mrpc"]),
        "unknown_label": (
            ["--task_name", "sst2", "--train_file", bad_label, *validation],
            ["--train_file", "7", "negative"],
        ),
        "empty_text_cell": (
            ["--task_name", "rte", "--train_file", holes, "--validation_file", holes],
            ["--train_file", "1 of 4 rows", "'sentence2'"],
        ),
        "label_not_in_training_data": (
            [*train, *validation],  # no --task_name: names in validation, ids in training
            ["--validation_file", "negative", "--train_file", "0, 1"],
        ),
        "output_dir_not_empty": (
            ["--task_name", "sst2", *train, "--output_dir", root],
            ["--output_dir", "not empty", "--overwrite_output_dir"],
        ),
        "bad_optim_args": (
            ["--task_name", "sst2", *train, "--optim", "adahessian", "--optim_args", "hessian_pow=2"],
            ["--optim_args", "hessian_pow"],
        ),
        "negative_learning_rate": (
            ["--task_name", "sst2", *train, "--optim", "adahessian", "--learning_rate", "-0.1"],
            ["--learning_rate", "-0.1", "positive"],
        ),
        "infinite_eps": (
            ["--task_name", "sst2", *train, "--optim", "adahessian", "--optim_args", "eps=inf"],
            ["--optim_args", "eps=inf", "finite"],
        ),
        "repeated_optim_args_key": (
            ["--task_name", "sst2", *train, "--optim", "adahessian", "--optim_args", "block_size=2,block_size=4"],
            ["block_size", "twice"],
        ),
        "lora_rank_zero": (
            ["--task_name", "sst2", *train, "--use_peft", "--lora_r", "0"],
            ["--lora_r", "positive"],
        ),
        "adamw_checkpoint": (
            ["--task_name", "sst2", *train, "--optim", "adahessian", "--resume_from_checkpoint", adamw_checkpoint],
            ["saved_by_adamw", "another optimizer", "--optim adahessian"],
        ),
    }


BAD_INPUT = ["unknown_task", "no_data", "wrong_extension", "missing_file", "missing_text_column", "unknown_label",
             "empty_text_cell", "label_not_in_training_data", "output_dir_not_empty", "bad_optim_args",
             "negative_learning_rate", "infinite_eps", "repeated_optim_args_key", "lora_rank_zero", "adamw_checkpoint"]  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_runs(bert, data, env, tmp_path_factory):
    """Every bad command line, each through the script's own `__main__` block.

    A fresh interpreter per case would spend ~5 s importing torch and transformers for a check that fails in
    milliseconds, so one child runs them all in turn (runpy, as `python run_glue.py` does) and one more case runs
    as a real process, to see the real exit status and the whole of stderr.
    """
    root = tmp_path_factory.mktemp("bad_input")
    cases = {
        name: ["--model_name_or_path", bert, "--output_dir", str(root / name), "--do_train", *COMMON]
        + [str(arg) for arg in args]
        for name, (args, _) in _bad_input_cases(data, root).items()
    }
    assert sorted(cases) == sorted(BAD_INPUT)
    in_one = subprocess.Popen(
        [sys.executable, "-c", RUN_EACH, str(SCRIPT), json.dumps(cases), str(root / "results.json")],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    real = run_glue(env, *cases[REAL_PROCESS_CASE], check=False)
    _, stderr = in_one.communicate(timeout=600)
    assert in_one.returncode == 0, stderr[-3000:]
    results = _json(root / "results.json")
    words = {name: w for name, (_, w) in _bad_input_cases(data, root).items()}
    return {name: (code, err, words[name]) for name, (code, err) in results.items()}, (real, words[REAL_PROCESS_CASE])


REAL_PROCESS_CASE = "missing_text_column"


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_status_2(bad_input_runs, name):
    _assert_usage_error(*bad_input_runs[0][name])


def test_bad_input_as_a_real_process(bad_input_runs):
    real, words = bad_input_runs[1]
    _assert_usage_error(real.returncode, real.stderr, words)
    # Only the message: what logging wrote before it is on stdout.
    assert [line for line in real.stderr.splitlines() if line.strip()][-1].startswith("error: ")


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_sst2_real_data_adahessian(env, tmp_path):
    train, validation = SHARED_DATA / "sst2" / "train.jsonl", SHARED_DATA / "sst2" / "validation.jsonl"
    if not train.is_file() or not validation.is_file():
        pytest.skip(f"the SST-2 files are not at {SHARED_DATA / 'sst2'} (they live beside the repository)")
    texts = []
    with open(train, encoding="utf-8") as f:
        for _, line in zip(range(5000), f):
            texts.append(json.loads(line)["sentence"])
    model = build_model_folder("bert", str(tmp_path / "bert"), texts, size="tiny", vocab_size=2000)
    out = tmp_path / "out"
    run_glue(
        env, "--model_name_or_path", model, "--task_name", "sst2", "--train_file", train,
        "--validation_file", validation, "--do_train", "--do_eval", "--max_train_samples", "1024",
        "--max_eval_samples", "256", "--max_steps", "40", "--per_device_train_batch_size", "16",
        "--max_seq_length", "64", "--output_dir", out, "--report_to", "none", "--use_cpu", "--logging_steps", "5",
        "--disable_tqdm", "true", "--optim", "adahessian", "--learning_rate", "0.05",
        "--optim_args", "hessian_interval=1,block_size=1", "--warmup_steps", "4",
    )  # fmt: skip
    results = _json(out / "all_results.json")
    assert results["train_samples"] == 1024 and results["eval_samples"] == 256
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    logs = _train_logs(out)
    assert logs[-1]["step"] == 40 and logs[-1]["skipped_hessian_updates"] == 0
    # A random tiny BERT after 40 steps: not good yet, but no worse than guessing on this balanced set.
    assert results["eval_loss"] < 0.75
