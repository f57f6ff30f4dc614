"""An unmodified TRL-style SFT script (trl's SFTTrainer and SFTConfig), for tests/test_launch.py.

    python -m hf_adahessian.launch tests/scripts/stock_sft.py --model_dir DIR --output_dir OUT --optim adahessian ...

It knows nothing of hf_adahessian: ``SFTConfig`` through ``HfArgumentParser``, a
small text dataset made here, ``SFTTrainer`` on a local causal-LM folder. Prints

    RESULT {"trainer": ..., "optimizer": ..., "hessian_updates": [...], "losses": [...]}
"""

import json
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig, SFTTrainer


@dataclass
class ScriptArguments:
    model_dir: str = field(metadata={"help": "a causal-LM folder"})


def main():
    script_args, config = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses()
    words = ["a man", "a dog", "two children", "a woman", "the team"]
    verbs = ["runs", "plays", "reads a book", "rides a bike", "sings"]
    texts = [f"{w} {v} in the park ." for w in words for v in verbs]
    dataset = Dataset.from_dict({"text": texts * 4})
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    print("RESULT " + json.dumps({
        "trainer": type(trainer).__name__, "config": type(config).__name__,
        "optimizer": type(optimizer).__name__,
        "hessian_updates": [h.get("hessian_updates") for h in logs], "losses": [h["loss"] for h in logs],
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
