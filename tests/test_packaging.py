"""What the package promises about itself: its dependencies, its public names, its README commands.

* ``hf_adahessian`` (optimizer, estimate, arguments, trainer, launch) imports and trains with
  only torch, transformers and accelerate: with the example tooling's dependencies made
  unimportable, ``AdaHessianTrainer`` trains a tiny model;
* the required dependencies name none of them;
* ``.ci/run`` runs the README's first two shell blocks verbatim, so the README cannot drift
  from what CI checks.
"""

import configparser
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN_WITHOUT_TOOLING = r"""
import sys

BLOCKED = sys.argv[1].split(",")
# As if not installed: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is None.
for name in BLOCKED:
    sys.modules[name] = None
import torch
from transformers import BertConfig, BertForSequenceClassification
import hf_adahessian
from hf_adahessian import AdaHessianTrainer, AdaHessianTrainingArguments
import hf_adahessian.launch  # the launcher too

class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 50, (32, 8), generator=g)
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=32, max_position_embeddings=16))
args = AdaHessianTrainingArguments(output_dir=sys.argv[2], optim="adahessian", learning_rate=0.05, max_steps=3,
    per_device_train_batch_size=8, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
trainer = AdaHessianTrainer(model=model, args=args, train_dataset=Rows())
trainer.train()
loaded = sorted(m for m in BLOCKED if sys.modules.get(m) is not None)
print("COUNTERS", trainer.adahessian.counters, "LOADED", loaded)
"""


def test_the_library_trains_with_only_torch_transformers_and_accelerate(tmp_path):
    blocked = ["datasets", "sklearn", "scipy", "sacrebleu", "evaluate", "matplotlib", "peft", "trl"]
    done = subprocess.run([sys.executable, "-c", TRAIN_WITHOUT_TOOLING, ",".join(blocked), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "COUNTERS {'step': 3, 'hessian_updates': 3, 'skipped_hessian_updates': 0, 'skipped_steps': 0}" in done.stdout
    assert "LOADED []" in done.stdout


def test_required_dependencies_are_torch_transformers_and_accelerate_only():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    required = [re.split(r"[<>=!~ ]", line.strip())[0] for line in config["options"]["install_requires"].splitlines()
                if line.strip()]
    assert sorted(required) == ["accelerate", "torch", "transformers"]


def _shell_blocks(markdown: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    return [[line for line in block.splitlines() if line.strip() and not line.startswith("#")] for block in blocks]


def test_ci_runs_the_readmes_first_two_shell_blocks_verbatim():
    readme = (REPO / "README.md").read_text()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()]
    first, second = _shell_blocks(readme)[:2]
    assert len(first) <= 2, "the quick start is at most two commands"
    position = 0
    for line in first + second:
        assert line in ci[position:], f"{line!r} is not in .ci/run (after line {position})"
        position = ci.index(line, position) + 1
