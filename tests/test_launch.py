"""hf_adahessian.launch: an unmodified stock script trains with ``--optim adahessian``.

``tests/scripts/stock_train.py`` imports ``HfArgumentParser``, ``TrainingArguments``
and ``Trainer`` from ``transformers`` and knows nothing of this package.  Run by
the launcher it parses ``--optim adahessian`` and trains with AdaHessian; run by
plain ``python`` the same command line is rejected by argparse, which shows that
the class substitution is what makes it work.

Every subprocess of the module is started by one fixture, a few at a time (each
is mostly interpreter and transformers start-up); the tests read their results.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.distributed as dist

from hf_adahessian import launch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
STOCK = SCRIPTS / "stock_train.py"
MAX_STEPS = 3
ACCELERATE = shutil.which("accelerate")
HAS_ACCELERATE_CPU_DDP = ACCELERATE is not None and dist.is_available() and dist.is_gloo_available()

def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", CUDA_VISIBLE_DEVICES="")
    return env


def train_args(out: Path, optim: str, lr: str) -> list[str]:
    return [
        "--output_dir", str(out), "--optim", optim, "--learning_rate", lr,
        "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def causal_lm_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A tiny GPT-2 folder from the package's builder, and train/validation .txt files."""
    from hf_adahessian.examples.models import build_model_folder

    words = ["a man", "a dog", "two children", "a woman", "the team", "an old man"]
    verbs = ["runs", "plays football", "reads a book", "rides a bike", "sings", "walks home"]
    lines = [f"{w} {v} in the park ." for w in words for v in verbs]
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    train.write_text("\n".join(lines * 3) + "\n")
    valid.write_text("\n".join(lines[::5]) + "\n")
    folder = build_model_folder("gpt2", str(tmp / "gpt2"), lines, size="tiny", vocab_size=300,
                                max_position_embeddings=64)
    return Path(folder), train, valid


@pytest.fixture(scope="module")
def procs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("launch")
    py, launcher = sys.executable, [sys.executable, "-m", "hf_adahessian.launch"]
    gpt2, train_txt, valid_txt = causal_lm_files(tmp)
    clm = [str(SCRIPTS / "stock_clm.py"), "--model_name_or_path", str(gpt2), "--train_file", str(train_txt),
           "--validation_file", str(valid_txt), "--block_size", "16", "--do_train", "--do_eval",
           *train_args(tmp / "clm", "adahessian", "0.05"), "--eval_strategy", "no"]
    sft_data = tmp / "sft_data"
    sft_data.mkdir()
    (sft_data / "train.jsonl").write_text("".join(json.dumps({"text": line}) + "\n"
                                                  for line in train_txt.read_text().splitlines()))
    # TRL's own SFT script, as the trl package ships it (it imports trl inside its functions).
    trl_sft = importlib.util.find_spec("trl.scripts.sft") if importlib.util.find_spec("trl") else None
    sft = [trl_sft.origin if trl_sft else "trl-is-not-installed.py", "--model_name_or_path", str(gpt2),
           "--dataset_name", str(sft_data), "--max_length", "16", *train_args(tmp / "sft", "adahessian", "0.05")]
    cmds = {
        "clm": [*launcher, *clm],
        "sft_exact": [*launcher, *sft],
        "sft_fd": [*launcher, *sft, "--optim_args", "hessian_estimator=finite_difference"],
        "sft_plain_python": [py, *sft],
        "own_parser": [*launcher, str(SCRIPTS / "own_parser.py"), "--optim", "adahessian"],
        "adahessian": [*launcher, str(STOCK), *train_args(tmp / "a", "adahessian", "0.05")],
        "plain_python": [py, str(STOCK), *train_args(tmp / "b", "adahessian", "0.05")],
        "adamw": [*launcher, str(STOCK), *train_args(tmp / "c", "adamw_torch", "1e-3")],
        "sibling_plain": [py, str(SCRIPTS / "sibling_import.py")],
        "sibling_launched": [*launcher, str(SCRIPTS / "sibling_import.py")],
        "missing": [*launcher, "no_such_script.py", "--optim", "adahessian"],
    }
    if HAS_ACCELERATE_CPU_DDP:
        # `--cpu` would take accelerate's simple launcher (one process, see the test);
        # `--multi_gpu` takes torch.distributed.run, and the script's --use_cpu keeps it on CPU.
        cmds["accelerate"] = [
            ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "hf_adahessian.launch", str(STOCK), *train_args(tmp / "d", "adahessian", "0.05"),
        ]

    def run(cmd):
        return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in cmds.items()}
        return {name: f.result() for name, f in futures.items()}


def results(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    # raw_decode: another rank's output may follow a result on the same line.
    decode = json.JSONDecoder().raw_decode
    found = [decode(line[len("RESULT "):])[0] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert found, proc.stdout[-3000:]
    return sorted(found, key=lambda r: r["rank"])


# ---------------------------------------------------------------------- a stock script, launched
def test_launch_runs_a_stock_script_with_adahessian(procs):
    (result,) = results(procs["adahessian"])
    assert result["trainer"] == "AdaHessianTrainer"
    assert result["training_args"] == "AdaHessianTrainingArguments"
    assert result["optim"] == "adahessian"
    assert result["optimizer"] == "AdaHessian"
    assert result["global_step"] == MAX_STEPS and result["n_loss_logs"] == MAX_STEPS
    assert result["hessian_mean_logged"]
    assert all(h > 0 for h in result["hessian_means"])


def test_plain_python_rejects_optim_adahessian(procs):
    """The same script and command line without the launcher: stock argparse refuses the name."""
    proc = procs["plain_python"]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "argument --optim: invalid choice: 'adahessian'" in proc.stderr
    assert "RESULT" not in proc.stdout


def test_launch_keeps_stock_optimizers_stock(procs):
    (result,) = results(procs["adamw"])
    assert result["trainer"] == "AdaHessianTrainer"
    assert result["optimizer"] == "AdamW"
    assert result["global_step"] == MAX_STEPS and result["n_loss_logs"] == MAX_STEPS
    assert not result["hessian_mean_logged"] and result["hessian_means"] == [None] * MAX_STEPS


@pytest.mark.parametrize("run", ["adahessian", "adamw"])
def test_a_launched_script_imports_the_subclasses(procs, run):
    """``from transformers import Trainer, TrainingArguments, Seq2SeqTrainer, Seq2SeqTrainingArguments``
    in the launched script gives the AdaHessian subclasses (``substitute_classes()``).

    Importing ``transformers.Trainer`` (through ``processing_utils``'s
    ``direct_transformers_import``) re-executes ``transformers/__init__.py``, which puts a
    new module object in ``sys.modules["transformers"]``; a script's ``from transformers
    import`` reads that one, so that is where the classes must be set.
    """
    (result,) = results(procs[run])
    assert result["imported"] == {
        "AdaHessianTrainer": "hf_adahessian.trainer",
        "AdaHessianTrainingArguments": "hf_adahessian.arguments",
        "AdaHessianSeq2SeqTrainer": "hf_adahessian.trainer",
        "AdaHessianSeq2SeqTrainingArguments": "hf_adahessian.arguments",
    }


def test_launch_puts_the_script_folder_on_sys_path(procs):
    """``python SCRIPT`` makes modules next to the script importable (transformers' run_qa.py
    does ``from utils_qa import ...``); the launcher must run the script the same way."""
    plain, launched = procs["sibling_plain"], procs["sibling_launched"]
    assert plain.returncode == 0 and "SIBLING 42" in plain.stdout, plain.stderr[-3000:]
    assert launched.returncode == 0 and "SIBLING 42" in launched.stdout, launched.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.skipif(not HAS_ACCELERATE_CPU_DDP, reason="needs the accelerate command line and gloo")
def test_accelerate_launch_two_cpu_processes(procs):
    """``accelerate launch --multi_gpu --num_processes 2 -m hf_adahessian.launch SCRIPT --use_cpu``.

    ``accelerate launch --cpu --num_processes 2`` (accelerate 1.15, no config file)
    takes accelerate's simple launcher and starts ONE process (world size 1);
    ``--multi_gpu`` takes torch.distributed.run, and the script's ``--use_cpu``
    keeps it on the CPU, where accelerate picks DDP over gloo.
    """
    found = results(procs["accelerate"])
    assert [r["rank"] for r in found] == [0, 1]
    for r in found:
        assert r["world_size"] == 2 and r["model_wrapped"] == "DistributedDataParallel"
        assert r["trainer"] == "AdaHessianTrainer" and r["optimizer"] == "AdaHessian"
        assert r["global_step"] == MAX_STEPS and r["hessian_mean_logged"]
    # The Hessian estimates are averaged across the ranks: both log the same values.
    assert found[0]["hessian_means"] == found[1]["hessian_means"]


# ---------------------------------------------------------------------- causal LMs and TRL
def test_a_stock_style_causal_lm_script_trains_offline_through_the_launcher(procs):
    """run_clm's shape: Trainer/TrainingArguments from transformers' submodules, load_dataset("text"),
    blocks of tokens, evaluate.load("accuracy") offline (the launcher's stand-in), perplexity."""
    (result,) = [json.loads(line[len("RESULT "):]) for line in procs["clm"].stdout.splitlines()
                 if line.startswith("RESULT ")] or [None]
    assert result is not None, procs["clm"].stderr[-3000:]
    assert result["trainer"] == "AdaHessianTrainer" and result["optimizer"] == "AdaHessian"
    assert result["metric"] == "OfflineMetric('accuracy')"
    assert result["hessian_updates"] == list(range(1, MAX_STEPS + 1))
    assert math.isfinite(result["perplexity"]) and 0.0 <= result["eval_accuracy"] <= 1.0


def _logged(proc) -> list[dict]:
    """The training log lines the Trainer prints ({'loss': ..., ...}), as dicts."""
    import ast

    return [ast.literal_eval(line[line.index("{'loss'"):line.index("}", line.index("{'loss'")) + 1])
            for line in proc.stdout.replace("\r", "\n").splitlines() if "{'loss'" in line]


@pytest.mark.parametrize("run", ["sft_exact", "sft_fd"])
def test_trls_own_sft_script_trains_with_adahessian(procs, run):
    """``python -m hf_adahessian.launch trl/scripts/sft.py --optim adahessian``, the script unmodified.
    TRL's loss runs through its fused LM head, a custom kernel with no double backward: the exact
    estimator takes the same NLL through the model's plain forward on Hessian micro-batches, finite
    differences go through TRL's kernel untouched."""
    pytest.importorskip("trl")
    proc = procs[run]
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = _logged(proc)
    assert [int(h["hessian_updates"]) for h in logs] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(float(h["loss"])) and float(h["hessian_mean"]) > 0 for h in logs)


def test_the_trl_script_without_the_launcher_refuses_the_name(procs):
    pytest.importorskip("trl")
    proc = procs["sft_plain_python"]
    assert proc.returncode == 2 and "invalid choice: 'adahessian'" in proc.stderr


def test_a_script_out_of_the_launchers_reach_is_told_why(procs):
    proc = procs["own_parser"]
    assert proc.returncode == 2
    assert "invalid choice: 'adahessian'" in proc.stderr
    assert "AdaHessianTrainingArguments" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------- the command line itself
def test_missing_script_is_a_clear_error(procs):
    proc = procs["missing"]
    assert proc.returncode != 0
    assert "script not found: no_such_script.py" in proc.stderr
    assert "usage: python -m hf_adahessian.launch SCRIPT.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_script_in_process(tmp_path):
    with pytest.raises(SystemExit) as exc:
        launch.main([str(tmp_path / "absent.py")])
    assert exc.value.code != 0 and "script not found" in str(exc.value.code)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_zero(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main([flag])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(launch.USAGE) and "accelerate launch -m hf_adahessian.launch" in out


def test_no_arguments_print_usage_and_fail(capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main([])
    assert exc.value.code == 2
    assert launch.USAGE in capsys.readouterr().err
