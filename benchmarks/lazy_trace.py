"""Why lazy Hessians fail on fine-tuning: a step-by-step trace of MiniLM on SST-2.

    python -m benchmarks.lazy_trace                       # the settings below, 150 steps each
    python -m benchmarks.lazy_trace --settings 'h10=hessian_interval=10;h1=hessian_interval=1'
    python -m benchmarks.lazy_trace --quick               # a few steps, two settings (CI)

A plain loop (this package's ``AdaHessian`` standalone: ``backward(create_graph=True)`` under
``double_backward_ready`` on the optimizer's Hessian steps, or ``opt.step(closure)`` with
``hessian_estimator=finite_difference``), the pretrained MiniLM with a
fresh 2-label head, batch 16 padded to 64 tokens, lr 0.03 with a linear schedule and 15
warm-up steps, no weight decay and no clipping; every setting sees the same batches (a
``torch.randperm`` of the training set drawn from ``--seed``) and the same head initialisation.

Per step it records the loss and the update measured in learning rates, max |Δθ|/lr over
all coordinates and the tensor holding it: AdaHessian's m̂/((√v̂)^k + eps) is unbounded, so
a stale or single-probe v̂ shows up here as a coordinate moving by tens of lr in one step.
It also counts the coordinates that moved by more than 1 and 10 lr: Adam's |m̂/√v̂| is
about 1 at most, so these are the coordinates whose denominator is short of their gradient.
And it records the root-mean-square |Δθ|/lr over all coordinates: how far the typical
coordinate moves, which a damped or stale denominator changes without any outlier; and the
tensor holding most of the step's squared length, with its share.  For the word embedding, whose
rows an estimate refreshes only when their tokens are in its batch, it splits the squared step by
when each row was last estimated (never, on the latest Hessian step, on an earlier one after the
dense warm-up, in the warm-up) and by how many estimates its v̂ rests on (the optimizer's row counts),
and records the stale guard's factor on its denominator (the mean over the rows estimated so far, each
row having its own), as it records the factor on the tensor holding most of each step.
A setting may also say how the word embedding itself is trained (``embedding=adahessian``, the default,
``embedding=adamw`` with ``embedding_lr``, default 1e-4, AdamW's SST-2 lr, under the same linear schedule,
or ``embedding=frozen``): it tells whether the lazy run loses on the embedding's rows or on the body.
The summary gives, per setting, the largest |Δθ|/lr in steps 2–10, 11–50 and 51 to the end,
how many coordinate steps exceeded 10 lr there, the mean RMS step there, the mean loss of the
last 10 steps and the dev accuracy on ``--max_eval_samples`` sentences.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .data import require_data
from .minilm import MAX_LENGTH
from .options import _common, output_dir
from .report import fmt, markdown_table, provenance, write_report

MODULE = "benchmarks.lazy_trace"
BATCH = 16
DEFAULT_SETTINGS = ("h1=hessian_interval=1;h10=hessian_interval=10;"
                    "h10_w15=hessian_interval=10,hessian_warmup=15;"
                    "h10_w15_sg=hessian_interval=10,hessian_warmup=15,stale_guard=true;"
                    "h10_w15_tw=hessian_interval=10,hessian_warmup=15,time_weighted=true;"
                    "h10_w15_clip1=hessian_interval=10,hessian_warmup=15,update_clip=1.0")
WINDOWS = ((2, 10), (11, 50), (51, None))
# Setting keys that are the trace's, not AdaHessian's: how the word embedding is trained.
EMBEDDING_MODES = ("adahessian", "adamw", "frozen")
EMBEDDING_LR = 1e-4
THRESHOLDS = (1, 10)


def parse_settings(text: str) -> dict[str, dict]:
    """``name=key=value,key=value;name=...`` into ``{name: AdaHessian kwargs}`` (values as JSON, else text)."""
    settings = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, knobs = part.partition("=")
        if not name or not knobs:
            raise argparse.ArgumentTypeError(f"{part!r}: write name=key=value[,key=value]")
        kwargs = {}
        for knob in knobs.split(","):
            key, sep, value = knob.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"{knob!r} in {part!r}: write key=value")
            try:
                kwargs[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key.strip()] = value
        if kwargs.get("embedding", EMBEDDING_MODES[0]) not in EMBEDDING_MODES:
            raise argparse.ArgumentTypeError(f"embedding={kwargs['embedding']!r} in {part!r}: accepted "
                                             f"{', '.join(EMBEDDING_MODES)}")
        settings[name.strip()] = kwargs
    if not settings:
        raise argparse.ArgumentTypeError("give at least one setting")
    return settings


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) == n:
                break
    return rows


def encode(tokenizer, rows: list[dict]) -> dict:
    import torch

    batch = dict(tokenizer([r["sentence"] for r in rows], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return batch


ROW_AGES = ("never", "latest", "earlier", "warmup")
# Bins of a row's estimate count, (label, least, most): a v̂ from one or two estimates is a noisy one.
ROW_COUNTS = (("1", 1, 1), ("2", 2, 2), ("3–5", 3, 5), ("6+", 6, None))


def row_age_shares(row_squares, last_estimate, latest: int, dense_until: int) -> dict[str, float]:
    """The share of a tensor's squared step in rows by when each was last estimated.

    ``row_squares``: the squared step summed per row; ``last_estimate``: per row the optimizer
    step of its latest estimate, 0 for never; ``latest``: the latest Hessian step; ``dense_until``:
    the last step of the dense warm-up (``hessian_warmup``).
    """
    total = float(row_squares.sum())
    masks = {"never": last_estimate == 0, "latest": last_estimate == latest,
             "earlier": (last_estimate > dense_until) & (last_estimate != latest),
             "warmup": (last_estimate > 0) & (last_estimate <= dense_until) & (last_estimate != latest)}
    return {age: float(row_squares[mask].sum()) / total if total else 0.0 for age, mask in masks.items()}


def row_count_shares(row_squares, counts) -> dict[str, float]:
    """The share of a tensor's squared step in rows by how many estimates their v̂ rests on (rows never
    estimated are left out: ``row_age_shares`` has them)."""
    total = float(row_squares.sum())
    return {label: float(row_squares[(counts >= least) & ((counts <= most) if most else True)].sum()) / total
            if total else 0.0 for label, least, most in ROW_COUNTS}


def row_counts(opt, p, rows: int):
    """Per row of ``p`` the estimates its v̂ rests on: the optimizer's own row counts, or the tensor's count
    while every estimate has seen every row."""
    import torch

    from hf_adahessian.optimizer import estimate_count

    state = opt.state.get(p, {})
    if "row_hessian_steps" in state:
        return state["row_hessian_steps"]
    return torch.full((rows,), float(estimate_count(state)) if state else 0.0)


def guard_factor(opt, p) -> float | None:
    """The stale guard's factor on ``p``'s denominator after this step, averaged over the rows estimated so
    far where rows have factors of their own (None without the guard)."""
    from hf_adahessian.optimizer import stale_factors

    state = opt.state.get(p, {})
    if not opt.stale_guard or not state:
        return None
    factors = stale_factors(state, opt.param_groups[0], opt.stale_guard_reference)
    if not isinstance(factors, float):
        seen = state["row_hessian_steps"] > 0
        return float(factors[seen].mean()) if bool(seen.any()) else 1.0
    return factors


def split_embedding(kwargs: dict, model) -> tuple[dict, list, object | None]:
    """The setting's AdaHessian kwargs (less the trace's own keys), the parameters AdaHessian trains, and the
    word embedding's own optimizer (AdamW, or None).

    ``embedding=frozen`` turns the embedding's ``requires_grad`` off; ``embedding=adamw`` leaves it to AdamW, so
    AdaHessian neither estimates nor steps it.
    """
    import torch

    kwargs = dict(kwargs)
    mode = kwargs.pop("embedding", "adahessian")
    lr = float(kwargs.pop("embedding_lr", EMBEDDING_LR))  # read even when unused: never an AdaHessian kwarg
    embedding = model.get_input_embeddings().weight
    if mode == "frozen":
        embedding.requires_grad_(False)
    body = [p for p in model.parameters() if p.requires_grad and (mode != "adamw" or p is not embedding)]
    extra = torch.optim.AdamW([embedding], lr=lr, weight_decay=0.0) if mode == "adamw" else None
    return kwargs, body, extra


def trace(kwargs: dict, train: list[dict], dev: list[dict], args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    from hf_adahessian import AdaHessian, double_backward_ready
    from hf_adahessian.examples.demo import minilm_folder

    torch.manual_seed(args.seed)  # the same fresh head for every setting
    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    adahessian_kwargs, body, extra = split_embedding(kwargs, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_name = dict(named)
    opt = AdaHessian(body, lr=args.lr, weight_decay=0.0, seed=args.seed, **adahessian_kwargs)
    schedules = [get_scheduler("linear", o, num_warmup_steps=args.warmup, num_training_steps=args.steps)
                 for o in (opt, extra) if o is not None]
    embedding = model.get_input_embeddings().weight
    others = [] if extra is None else [embedding]
    last_estimate = torch.zeros(embedding.shape[0], dtype=torch.long)
    latest = 0
    steps, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = encode(tokenizer, train[step * BATCH:(step + 1) * BATCH])
        before = [p.detach().clone() for _, p in named]
        hessian = opt.is_hessian_step()
        lr = opt.param_groups[0]["lr"]
        if hessian and opt.hessian_estimator == "finite_difference":
            first = []  # the embedding's gradient at θ, for AdamW: the perturbed calls overwrite .grad

            def closure():
                opt.zero_grad(set_to_none=True)
                for p in others:
                    p.grad = None
                closure_loss = model(**batch).loss
                closure_loss.backward()
                if not first:
                    first.extend(p.grad for p in others)
                return closure_loss

            loss = opt.step(closure)
            for p, g in zip(others, first):
                p.grad = g
        else:
            if hessian:
                with double_backward_ready(model):
                    loss = model(**batch).loss
                loss.backward(create_graph=True)
            else:
                loss = model(**batch).loss
                loss.backward()
            opt.step()
        if extra is not None:
            extra.step()
            extra.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        for schedule in schedules:
            schedule.step()
        if hessian:
            latest = step + 1
            last_estimate[batch["input_ids"].unique()] = latest
        moves, over, squares, count = [], {t: 0 for t in THRESHOLDS}, {}, 0
        ages = counts = None
        for (n, p), b in zip(named, before):
            delta = (p.detach() - b).abs_()
            if p is embedding and extra is None:  # rows split by AdaHessian's estimates, where it trains them
                row_squares = delta.double().square().sum(dim=1)
                ages = row_age_shares(row_squares, last_estimate, latest, opt.hessian_warmup)
                counts = row_count_shares(row_squares, row_counts(opt, p, row_squares.shape[0]))
            moves.append((delta.max().item(), n))
            squares[n] = float(delta.double().square().sum())
            count += delta.numel()
            for t in THRESHOLDS:
                over[t] += int((delta > t * lr).sum()) if lr > 0 else 0
        del before
        largest, tensor = max(moves)
        total = sum(squares.values())
        heaviest = max(squares, key=squares.get)
        steps.append({"step": step + 1, "hessian": hessian, "lr": lr, "loss": loss.item(),
                      # the first step's lr is 0 under warm-up: nothing moves, nothing to measure
                      "max_update_over_lr": largest / lr if lr > 0 else None, "tensor": tensor,
                      # the typical coordinate's step: how far the run moves, where the max shows its outliers
                      "rms_update_over_lr": math.sqrt(total / count) / lr if lr > 0 else None,
                      # the tensor that holds most of the step's squared length, and how much of it
                      "heaviest_tensor": heaviest, "heaviest_share": squares[heaviest] / total if total else None,
                      # the stale guard's factor on that tensor's denominator (None without the guard)
                      "heaviest_guard_factor": guard_factor(opt, by_name[heaviest]),
                      # how many coordinates moved by more than t learning rates (Adam's |m̂/√v̂| is ~1 at most)
                      **{f"coords_over_{t}_lr": over[t] for t in THRESHOLDS},
                      # the word embedding's squared step by when its rows were last estimated
                      "embedding_share_by_age": ages, "embedding_share_by_count": counts,
                      "embedding_guard_factor": guard_factor(opt, embedding)})
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            ratio = steps[-1]["max_update_over_lr"]
            print(f"  step {step + 1:4d} {'H' if hessian else '.'} loss {loss.item():.3f} "
                  f"largest step/lr {fmt(ratio, '.2f')} ({tensor}); coordinates over "
                  + ", ".join(f"{t} lr: {over[t]}" for t in THRESHOLDS), flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            batch = encode(tokenizer, dev[i:i + 64])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return {"kwargs": kwargs, "dev_accuracy": correct / len(dev), "seconds": time.perf_counter() - start,
            "steps": steps}


def window_max(steps: list[dict], first: int, last: int | None) -> tuple[float | None, str]:
    inside = [s for s in steps if s["max_update_over_lr"] is not None and first <= s["step"]
              and (last is None or s["step"] <= last)]
    if not inside:
        return None, "–"
    top = max(inside, key=lambda s: s["max_update_over_lr"])
    return top["max_update_over_lr"], f"{top['tensor']} (step {top['step']})"


def window_mean_rms(steps: list[dict], first: int, last: int | None) -> float | None:
    """The mean over the window's measured steps of the root-mean-square |Δθ|/lr over all coordinates."""
    inside = [s["rms_update_over_lr"] for s in steps if s.get("rms_update_over_lr") is not None
              and first <= s["step"] and (last is None or s["step"] <= last)]
    return sum(inside) / len(inside) if inside else None


def window_heaviest(steps: list[dict], first: int, last: int | None) -> str:
    """The tensor that most often holds most of a step's squared length in the window, with its mean share
    of it over those steps and how many steps it heads."""
    inside = [s for s in steps if s.get("heaviest_share") is not None and first <= s["step"]
              and (last is None or s["step"] <= last)]
    if not inside:
        return "–"
    names = [s["heaviest_tensor"] for s in inside]
    top = max(set(names), key=names.count)
    shares = [s["heaviest_share"] for s in inside if s["heaviest_tensor"] == top]
    return f"{top} ({sum(shares) / len(shares):.0%} of it on {len(shares)} of {len(inside)} steps)"


def window_ages(steps: list[dict], first: int, last: int | None) -> str:
    """The word embedding's squared step by when its rows were last estimated and by how many estimates
    their v̂ rests on, each share averaged over the window's steps, and the mean stale-guard factor on its
    denominator where the guard is on."""
    inside = [s for s in steps if s.get("embedding_share_by_age") and first <= s["step"]
              and (last is None or s["step"] <= last)]
    if not inside:
        return "–"
    text = " · ".join(f"{age} {sum(s['embedding_share_by_age'][age] for s in inside) / len(inside):.0%}"
                      for age in ROW_AGES)
    with_counts = [s for s in inside if s.get("embedding_share_by_count")]
    if with_counts:
        text += "; by estimates " + " · ".join(
            f"{label} {sum(s['embedding_share_by_count'][label] for s in with_counts) / len(with_counts):.0%}"
            for label, _, _ in ROW_COUNTS)
    factors = [s["embedding_guard_factor"] for s in inside if s.get("embedding_guard_factor") is not None]
    return text + (f"; guard ×{sum(factors) / len(factors):.2f}" if factors else "")


def coords_over(steps: list[dict], first: int, last: int | None, threshold: int = THRESHOLDS[-1]) -> int:
    """How many (coordinate, step) pairs in the window moved by more than ``threshold`` learning rates."""
    return sum(s[f"coords_over_{threshold}_lr"] for s in steps
               if first <= s["step"] and (last is None or s["step"] <= last))


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "6 steps of h1, h10 and h10 with an AdamW embedding on 64 dev sentences, written to a temporary "
               "folder (CI)")
    p.add_argument("--settings", type=parse_settings, default=None,
                   help=f"name=key=value,...;name=... AdaHessian keyword arguments (default: {DEFAULT_SETTINGS})")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--warmup", type=int, default=15, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_eval_samples", type=int, default=None, help="dev sentences (default: all 872)")
    p.add_argument("--log_every", type=int, default=10)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.log_every = 6, 2, 1
        args.max_eval_samples = args.max_eval_samples or 64
        args.settings = args.settings or parse_settings(
            "h1=hessian_interval=1;h10=hessian_interval=10;h10_emb_adamw=hessian_interval=10,embedding=adamw")
    settings = args.settings or parse_settings(DEFAULT_SETTINGS)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    folder = require_data(args.data_dir, "sst2")
    train = read_jsonl(folder / "train.jsonl")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.steps * BATCH]
    train = [train[i] for i in order.tolist()]
    dev = read_jsonl(folder / "validation.jsonl", args.max_eval_samples)
    out = output_dir(args, "sst2", "lazy_trace")

    results = {}
    for name, kwargs in settings.items():
        print(f"{name}: {kwargs}", flush=True)
        results[name] = trace(kwargs, train, dev, args)
    rows = []
    for name, r in results.items():
        row = [name, ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()), fmt(r["dev_accuracy"], ".4f")]
        for first, last in WINDOWS:
            ratio, where = window_max(r["steps"], first, last)
            row += [fmt(ratio, ".2f"), where, str(coords_over(r["steps"], first, last)),
                    fmt(window_mean_rms(r["steps"], first, last), ".4f"), window_heaviest(r["steps"], first, last),
                    window_ages(r["steps"], first, last)]
        tail = [s["loss"] for s in r["steps"][-10:]]
        rows.append(row + [fmt(sum(tail) / len(tail), ".3f")])
    headers = ["setting", "AdaHessian arguments", "dev accuracy"]
    for first, last in WINDOWS:
        span = f"steps {first}–{last or 'end'}"
        headers += [f"largest step / lr, {span}", "where", f"coordinate steps over {THRESHOLDS[-1]} lr, {span}",
                    f"RMS step / lr, mean over {span}", f"tensor holding most of the squared step, {span}",
                    f"word embedding's squared step by its rows' last estimate, {span}"]
    headers.append("mean loss, last 10 steps")
    text = (f"## Lazy Hessians on fine-tuning: MiniLM on SST-2, plain loop\n\n{args.steps} steps, batch {BATCH}, "
            f"length {MAX_LENGTH}, lr {args.lr}, linear schedule with {args.warmup} warm-up steps, no weight decay, "
            f"no clipping, seed {args.seed}; dev accuracy on {len(dev)} sentences\n\n"
            f"{markdown_table(headers, rows)}\n")
    write_report(out, text, {**provenance(args.threads, MODULE), "lr": args.lr, "steps": args.steps,
                             "warmup": args.warmup, "seed": args.seed, "results": results})


if __name__ == "__main__":
    main()
