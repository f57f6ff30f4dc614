"""What a lazy schedule costs per step against the fused AdamW, from interleaved medians, on a task's own model.

    python -m benchmarks.schedule_cost --task multi30k [--repeats 31]   # Marian-small, batch 32, 800 steps
    python -m benchmarks.schedule_cost --task sst2                      # MiniLM, batch 16, 150 steps
    python -m benchmarks.schedule_cost --quick                          # CI: one round each, a temporary folder

A comparison's s/step ratio divides two runs minutes apart, and between two runs this machine's state
moves a run's s/step by 10-20 % (the fused AdamW's own seeds on Multi30k: 0.284 to 0.340 s/step in one
invocation). Here three steps take turns on one batch in one process, each round in its own random order
(so that no kind always follows the Hessian step's memory churn): the fused AdamW step (transformers 5's
default ``--optim``), AdaHessian's step between two estimates under the task's recipe (after one estimate,
so v and the rows' counts exist, as in training) and its finite-difference Hessian step. Each schedule's
time per step is the two AdaHessian medians weighted by the share of the task's training steps that take
a Hessian under the schedule's own rule; over the fused AdamW's median, that is the time target's ratio
without the minutes between two runs in it. The recipe's settings are read from the task's registry row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from . import multi30k, sst2
from .specs import TRAINER_KEYS
from .data import require_data
from .minilm import minilm_for_training
from .minilm import setup as minilm_setup
from .model_folder import build_model
from .options import output_dir, schedule_cost_parser
from .report import fmt, markdown_table, provenance, write_report
from .steps import backward_step, finite_difference_hessian_step, measure

MODULE = "benchmarks.schedule_cost"  # how it is run: python -m MODULE
ADAMW = "fused AdamW step"
BETWEEN = "AdaHessian step between estimates"
HESSIAN = "AdaHessian finite-difference Hessian step"
NEVER_AGAIN = 10**9  # an interval after which no second estimate comes
# The schedule's own keys: the steps above set them; the rest of a row is the recipe each step runs under.
SCHEDULE_KEYS = ("hessian_interval", "hessian_warmup", "hessian_warmup_interval")


def minilm_setup_for(threads: int, data_dir, out_dir) -> tuple[dict, Callable]:
    """The step profiles' MiniLM batch (16 SST-2 sentences) and model."""
    return minilm_setup(threads, data_dir), minilm_for_training


def marian_setup(threads: int, data_dir, out_dir) -> tuple[dict, Callable]:
    """The Multi30k benchmark's model folder (built as its comparison builds it) and 32 training pairs."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .machine import child_env

    torch.set_num_threads(threads)
    train = require_data(data_dir, "multi30k") / "train.jsonl"
    folder, _, _ = build_model(out_dir, child_env(threads), "marian", train)
    with open(train, encoding="utf-8") as f:
        pairs = [json.loads(line)["translation"] for line, _ in zip(f, range(multi30k.BATCH_SIZE))]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer([p["de"] for p in pairs], text_target=[p["en"] for p in pairs], max_length=64,
                           truncation=True, padding=True, return_tensors="pt"))
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)

    def model():
        m = AutoModelForSeq2SeqLM.from_pretrained(folder)
        m.train()
        return m, [p for p in m.parameters() if p.requires_grad]

    return batch, model


@dataclass(frozen=True)
class Task:
    registry: dict
    steps: int  # the full budget's optimizer steps
    recipe: str  # the row whose settings the AdaHessian steps take
    schedules: tuple[str, ...]  # rows whose schedules are weighted
    setup: Callable  # (threads, data_dir, out_dir) -> (batch, a function making (model, its parameters))


TASKS = {
    "sst2": Task(sst2.OPTIMIZERS, sst2.BUDGETS.full.max_steps, "adahessian_h20_fd_w15_sg_sga_ch",
                 ("adahessian_h20_fd_w15_sg_sga_ch", "adahessian_h20_fd_w5_sg_sga_ch",
                  "adahessian_h20_fd_w15_i3_sg_sga_ch"), minilm_setup_for),
    "multi30k": Task(multi30k.OPTIMIZERS, multi30k.BUDGETS.full.max_steps, "adahessian_h20_b32_fd_w15_sg_sga_ch",
                     ("adahessian_h20_b32_fd_w15_sg_sga_ch", "adahessian_h20_b32_fd_w5_sg_sga_ch",
                      "adahessian_h20_b32_fd_w15_i3_sg_sga_ch"), marian_setup),
}


def hessian_steps(interval: int, warmup: int, warmup_interval: int = 1, steps: int = 150) -> int:
    """How many of ``steps`` optimizer steps take a Hessian under AdaHessian's own schedule."""
    import torch

    from hf_adahessian import AdaHessian

    rule = AdaHessian([torch.zeros(1, requires_grad=True)], hessian_interval=interval, hessian_warmup=warmup,
                      hessian_warmup_interval=warmup_interval)
    return sum(rule._is_hessian_index(step) for step in range(steps))


def weighted_step(hessian: int, steps: int, between_s: float, hessian_s: float) -> float:
    """A run's time per step: ``hessian`` of its ``steps`` at the Hessian step's seconds, the rest between."""
    return ((steps - hessian) * between_s + hessian * hessian_s) / steps


def recipe_kwargs(optim_args: dict) -> dict:
    """The optimizer's keyword arguments of a registry row, less its schedule and the trainer's keys."""
    return {k: v for k, v in optim_args.items() if k not in SCHEDULE_KEYS + TRAINER_KEYS}


def schedule_rows(task: Task, totals: dict) -> list[dict]:
    """Per schedule row: its Hessian steps in the task's budget, its time per step, that over the fused AdamW's."""
    rows = []
    for name in task.schedules:
        args = task.registry[name].optim_args
        h = hessian_steps(*(args[k] for k in SCHEDULE_KEYS), steps=task.steps)
        per_step = weighted_step(h, task.steps, totals[BETWEEN], totals[HESSIAN])
        rows.append({"row": name, "hessian_steps": h, "steps": task.steps, "s_per_step": per_step,
                     "x_fused_adamw": per_step / totals[ADAMW]})
    return rows


def step_kinds(batch: dict, model, recipe: dict) -> dict:
    """{kind: one step of it}: the fused AdamW, and AdaHessian under ``recipe`` between estimates and on one."""
    import torch

    from hf_adahessian import AdaHessian

    kinds = {}
    m, p = model()
    adamw = torch.optim.AdamW(p, lr=1e-5, fused=True)
    kinds[ADAMW] = lambda phase, m=m, p=p: backward_step(m, batch, adamw, p, phase)
    m, p = model()
    between = AdaHessian(p, lr=1e-3, seed=0, hessian_interval=NEVER_AGAIN, **recipe)
    finite_difference_hessian_step(m, batch, between)  # the one estimate: v and the rows' counts exist
    kinds[BETWEEN] = lambda phase, m=m, p=p: backward_step(m, batch, between, p, phase)
    m, p = model()
    every = AdaHessian(p, lr=1e-3, seed=0, hessian_interval=1, **recipe)
    kinds[HESSIAN] = lambda phase, m=m: finite_difference_hessian_step(m, batch, every, phase)
    return kinds


def main() -> None:
    args = schedule_cost_parser(MODULE, __doc__, TASKS).parse_args()
    repeats = args.repeats or (1 if args.quick else 31)
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else 3
    out = output_dir(args, "schedule_cost", "profile")

    sections, record = [], {**provenance(args.threads, MODULE), "repeats": repeats, "warmup": warmup, "tasks": {}}
    for name in args.task or sorted(TASKS):
        task = TASKS[name]
        recipe = recipe_kwargs(task.registry[task.recipe].optim_args)
        batch, model = task.setup(args.threads, args.data_dir, out)
        summary, rounds, measure_s = measure(step_kinds(batch, model, recipe), warmup, repeats, shuffle=True)
        totals = {kind: phases["total"]["median_s"] for kind, phases in summary.items()}
        schedules = schedule_rows(task, totals)
        steps_table = markdown_table(
            ["step", "median s", "min s", "update median s", "× fused AdamW step"],
            [[kind, fmt(s["total"]["median_s"]), fmt(s["total"]["min_s"]), fmt(s["update"]["median_s"]),
              fmt(totals[kind] / totals[ADAMW], ".3f")] for kind, s in summary.items()])
        schedule_table = markdown_table(
            ["schedule (registry row)", "Hessian steps", "s/step", "× fused AdamW step"],
            [[r["row"], f"{r['hessian_steps']} of {r['steps']}", fmt(r["s_per_step"]), fmt(r["x_fused_adamw"], ".3f")]
             for r in schedules])
        sections.append(f"## {name}: medians over {repeats} shuffled interleaved rounds after {warmup} warm-up "
                        f"rounds, {args.threads} threads\n\nAdaHessian under `{task.recipe}`'s settings: "
                        f"{recipe}\n\n{steps_table}\n\n{schedule_table}\n")
        record["tasks"][name] = {"recipe_row": task.recipe, "recipe": recipe, "steps": task.steps,
                                 "summary": summary, "rounds": rounds, "measure_s": measure_s,
                                 "schedules": schedules}
    write_report(out, "\n".join(sections), record)


if __name__ == "__main__":
    main()
