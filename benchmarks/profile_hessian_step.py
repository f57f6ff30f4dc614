"""Where one AdaHessian Hessian step spends its time: MiniLM, batch 16, length 64, on CPU.

    python -m benchmarks.profile_hessian_step [--repeats 15] [--warmup 3] [--estimators exact,finite_difference]
    python -m benchmarks.profile_hessian_step --quick     # CI: one round, one profiled step, a temporary folder

Each step is taken apart from the package's own pieces (``steps.py``), with a timer around each phase.
The exact estimator (the paper's double backward):

    forward          the model's loss, under hessian_pass.double_backward_ready (SDPA's math kernel)
    grad (graph)     torch.autograd.grad(loss, params, create_graph=True)
    Hessian-vector   optimizer.estimate().accumulate(grads=...): the probes, Hz through the
                     gradients' graph, z ⊙ Hz into the step's estimate, the gradients into .grad
    clip             clip_grad_norm_(1.0), as the Trainer does
    update           optimizer.step(): |D|, block averages, finiteness check, the update
    zero_grad        set_to_none

The finite-difference estimator (``hessian_estimator=finite_difference``), as the trainer runs it:

    perturb θ+εz     estimators.perturbed: θ += εz, the entries its round trip loses kept
    forward (θ+εz), grad (θ+εz)   an ordinary forward and gradient at the perturbed point
    g(θ+εz) folded   estimators.add_perturbed_gradients
    restore θ        θ −= εz, the kept entries put back
    forward, backward   the step's own gradient at θ (same dropout masks)
    difference       est.finish_(): Hz ≈ (g(θ+εz) − g(θ)) / ε
    clip, update, zero_grad

Beside it, the same estimate by forward over reverse (``steps.forward_over_reverse_hessian_step``: a forward
on dual parameters, then an ordinary backward carrying the tangents), which keeps no graph of the backward.
Beside the exact estimate in 4 chunks, the work each chunk repeats over the parameters outside
embeddings, alone (``steps.chunk_parameter_passes``: the probes' float copy, a fresh gradient and
Hz, their sums): the floor of a chunk's cost beyond its share of the double backward.

In the same process and interleaved round by round (so that another process on the cores
slows all of them alike), the same batch through an AdamW step (``torch.optim.AdamW``'s for-loop and its
fused kernel, transformers 5's default), an AdaHessian step without a
Hessian (the steps between two estimates when hessian_interval > 1; plain and under the stale guard with
either reference) and, with ``--peers``, the
peer packages' Hessian steps (``backward(create_graph=True)`` under ``double_backward_ready``,
then their ``step()``). Each is measured ``--repeats`` times after ``--warmup`` rounds and the
medians are reported (the first, cold, round is kept in the JSON). A ``torch.profiler`` trace of
``--profile_steps`` Hessian steps per estimator then gives the top operators by self CPU time.
From the medians, a run's time per step under the SST-2 schedules that ``schedule_cost`` weighs (the
finite-difference Hessian step in the share of the SST-2 benchmark's 150 steps that takes one, the
step under the stale guard in the rest) over each AdamW step: the time target's ratio without the
minutes between two comparison runs in it.
"""

from __future__ import annotations

import argparse
import statistics

from . import specs
from .minilm import BATCH_SIZE, MAX_LENGTH, minilm_for_training, setup
from .options import output_dir, profile_parser
from . import schedule_cost as cost
from .schedule_cost import TASKS, schedule_rows
from .report import fmt, markdown_table, provenance, write_report
from .steps import (
    PhaseTimer,
    backward_step,
    chunk_parameter_passes,
    chunked_hessian_step,
    exact_hessian_step,
    fd_sub_batch_hessian_step,
    finite_difference_hessian_step,
    forward_over_reverse_hessian_step,
    measure,
)

MODULE = "benchmarks.profile_hessian_step"  # how it is run: python -m MODULE
# Every AdaHessian here: these settings, and a Hessian on every step (interval 1) unless said.
ADAHESSIAN = {"lr": 1e-3, "block_size": 32, "seed": 0}
CHUNKS = 4  # the exact estimate in chunks (hessian_chunks)
NEVER_AGAIN = 10**9  # an interval after which no second estimate comes: every step after the first is plain
# The steps between estimates, plain and under the stale guard with each reference (the word embedding's rows
# are counted apart there: one estimate saw only the batch's tokens).
GUARDS = {"": {}, ", stale guard (last)": {"stale_guard": True},
          ", stale guard (average)": {"stale_guard": True, "stale_guard_reference": "average"}}
HESSIAN_STEP = {"exact": "adahessian exact Hessian step", "finite_difference": "adahessian finite-difference Hessian step"}
HESSIAN_FN = {"exact": exact_hessian_step, "finite_difference": finite_difference_hessian_step}
FUSED_ADAMW = "adamw step (fused)"
FORWARD_OVER_REVERSE = "adahessian exact Hessian step, forward over reverse"
# The step between two estimates that the schedules weigh against the finite-difference Hessian step.
BETWEEN = "adahessian step without Hessian, stale guard (average)"
PEERS = (specs.torch_optimizer_adahessian(1e-3, ()), specs.pytorch_optimizer_adahessian(1e-3, ()),
         specs.sophiah(1, 1e-3, ()))


def step_kinds(batch: dict, estimators: list[str], fd_scheme: str, peers: bool) -> tuple[dict, int]:
    """{kind: function of a phase factory that runs one step of that kind}; the parameter count."""
    import torch

    from hf_adahessian import AdaHessian

    kinds = {}
    model, params = minilm_for_training()
    adamw = torch.optim.AdamW(params, lr=1e-5)
    kinds["adamw step"] = lambda phase, m=model, p=params: backward_step(m, batch, adamw, p, phase)
    m, p = minilm_for_training()
    fused = torch.optim.AdamW(p, lr=1e-5, fused=True)  # --optim adamw_torch_fused, transformers 5's default
    kinds[FUSED_ADAMW] = lambda phase, m=m, p=p, opt=fused: backward_step(m, batch, opt, p, phase)
    for estimator in estimators:
        m, p = minilm_for_training()
        opt = AdaHessian(p, hessian_interval=1, hessian_estimator=estimator, fd_scheme=fd_scheme, **ADAHESSIAN)
        kinds[HESSIAN_STEP[estimator]] = lambda phase, m=m, opt=opt, fn=HESSIAN_FN[estimator]: fn(m, batch, opt, phase)
        m, p = minilm_for_training()
        opt = AdaHessian(p, hessian_interval=1, hessian_estimator=estimator, fd_scheme=fd_scheme, **ADAHESSIAN)
        if estimator == "exact":
            kinds[f"{HESSIAN_STEP[estimator]} in {CHUNKS} chunks"] = (
                lambda phase, m=m, opt=opt: chunked_hessian_step(m, batch, opt, CHUNKS, phase))
            passes, count = chunk_parameter_passes(m)
            kinds[f"one chunk's parameter passes ({count / 1e6:.1f}M parameters outside embeddings)"] = passes
            m, p = minilm_for_training()
            opt = AdaHessian(p, hessian_interval=1, hessian_estimator=estimator, **ADAHESSIAN)
            kinds[FORWARD_OVER_REVERSE] = (
                lambda phase, m=m, opt=opt: forward_over_reverse_hessian_step(m, batch, opt, phase))
        else:
            kinds[f"{HESSIAN_STEP[estimator]}, 1/16 of the batch"] = (
                lambda phase, m=m, opt=opt: fd_sub_batch_hessian_step(m, batch, opt, 1 / 16, phase))
    for name, guard in GUARDS.items():
        m, p = minilm_for_training()
        between = AdaHessian(p, hessian_interval=NEVER_AGAIN, **ADAHESSIAN, **guard)
        exact_hessian_step(m, batch, between)  # the one estimate: v exists, as between two estimates in training
        kinds[f"adahessian step without Hessian{name}"] = (
            lambda phase, m=m, p=p, opt=between: backward_step(m, batch, opt, p, phase))
    if peers:
        # The peer packages' Hessian steps, interleaved with ours: a ratio that one busy moment
        # cannot tilt, unlike two comparison runs minutes apart.
        for spec in PEERS:
            m, p = minilm_for_training()
            opt = specs.build_loop_optimizer(spec, p, lr=spec.lr, seed=0)
            kinds[f"{spec.name} Hessian step"] = (
                lambda phase, m=m, p=p, opt=opt: backward_step(m, batch, opt, p, phase, create_graph=True))
    return kinds, sum(t.numel() for t in params)


def top_operators(fn, steps: int, top: int) -> dict:
    """``steps`` Hessian steps, one ``torch.profiler`` each; per operator the median self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    per_step, timers, phases = [], [], set()
    for _ in range(steps):
        timer = PhaseTimer(ranges=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(timer)
        timers.append(timer.seconds)
        phases |= set(timer.seconds)
        per_step.append({e.key: (e.self_cpu_time_total / 1e3, e.cpu_time_total / 1e3, e.count)
                         for e in prof.key_averages()})
    keys = {k for step in per_step for k in step}

    def median_of(key, i):
        return statistics.median(step.get(key, (0.0, 0.0, 0))[i] for step in per_step)

    ops = [{"op": k, "self_cpu_ms": median_of(k, 0), "cpu_total_ms": median_of(k, 1), "calls": median_of(k, 2)}
           for k in keys if k not in phases]
    return {"phase_cpu_ms": {k: median_of(k, 1) for k in phases if k in keys},
            "total_self_cpu_ms": sum(o["self_cpu_ms"] for o in ops) or 1.0,
            # Every operator call, nested ones included: the fixed cost of a step grows with it.
            "operator_calls": sum(o["calls"] for o in ops),
            "step_timers": timers, "top_ops": sorted(ops, key=lambda o: o["self_cpu_ms"], reverse=True)[:top]}


def schedule_lines(totals: dict) -> list[str]:
    """Each SST-2 schedule's time per step (``schedule_cost``'s rows), weighted from the medians, over each
    AdamW's step."""
    hessian = totals.get(HESSIAN_STEP["finite_difference"])
    if hessian is None or BETWEEN not in totals:
        return []
    rows = schedule_rows(TASKS["sst2"], {cost.ADAMW: totals[FUSED_ADAMW], cost.BETWEEN: totals[BETWEEN],
                                         cost.HESSIAN: hessian})
    return [f"{r['row']}, {r['hessian_steps']} of {r['steps']} steps with a Hessian: {r['s_per_step']:.3f} s/step, "
            f"{r['s_per_step'] / totals['adamw step']:.2f}× the AdamW step, "
            f"{r['x_fused_adamw']:.2f}× the fused AdamW step" for r in rows]


def main() -> None:
    p = profile_parser(MODULE, __doc__)
    p.add_argument("--repeats", type=int, help="measured rounds (default: 15; quick 1)")
    p.add_argument("--warmup", type=int, help="rounds left out (default: 3; quick 0)")
    p.add_argument("--profile_steps", type=int, help="Hessian steps under torch.profiler per estimator, median "
                                                      "(default: 5; quick 1)")
    p.add_argument("--top", type=int, default=15, help="operators listed (default: %(default)s)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the peer packages' Hessian steps, interleaved (default: on)")
    args = p.parse_args()
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else 15
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else 3
    profile_steps = args.profile_steps if args.profile_steps is not None else 1 if args.quick else 5

    batch = setup(args.threads, args.data_dir)
    out = output_dir(args, "sst2", "profile")
    kinds, n_params = step_kinds(batch, args.estimators, args.fd_scheme, args.peers)
    summary, rounds, measure_s = measure(kinds, warmup, repeats)
    profiled = {e: HESSIAN_STEP[e] for e in args.estimators}
    if "exact" in args.estimators:
        profiled[f"exact in {CHUNKS} chunks"] = f"{HESSIAN_STEP['exact']} in {CHUNKS} chunks"
    profiles = {name: top_operators(kinds[kind], profile_steps, args.top) for name, kind in profiled.items()}

    adam_total = summary["adamw step"]["total"]["median_s"]
    rows = [[kind, phase, fmt(s["median_s"]), fmt(s["min_s"]), fmt(s["first_round_s"]), fmt(s["median_s"] / adam_total, ".2f")]
            for kind, phases in summary.items() for phase, s in phases.items()]
    table = markdown_table(["step", "phase", "median s", "min s", "cold (1st) s", "× AdamW step"], rows)
    totals = {kind: phases["total"]["median_s"] for kind, phases in summary.items()}
    ratio_lines = [f"{kind} / AdamW step: {totals[kind] / adam_total:.2f}×" for kind in totals if kind != "adamw step"]
    ours = totals.get(HESSIAN_STEP["exact"])
    chunked = totals.get(f"{HESSIAN_STEP['exact']} in {CHUNKS} chunks")
    if ours and chunked:
        ratio_lines.append(f"exact in {CHUNKS} chunks / exact: {chunked / ours:.3f}×")
    if ours and FORWARD_OVER_REVERSE in totals:
        ratio_lines.append(f"exact, forward over reverse / exact: {totals[FORWARD_OVER_REVERSE] / ours:.3f}×")
    if ours:
        ratio_lines += [f"{s.name} Hessian step / ours (exact): {totals[f'{s.name} Hessian step'] / ours:.3f}×"
                        for s in PEERS if f"{s.name} Hessian step" in totals]
    ratio_lines += schedule_lines(totals)
    sections = []
    for estimator, prof in profiles.items():
        op_table = markdown_table(
            ["operator", "self CPU ms per Hessian step", "share", "calls"],
            [[t["op"], fmt(t["self_cpu_ms"], ".1f"), fmt(t["self_cpu_ms"] / prof["total_self_cpu_ms"], ".1%"),
              fmt(t["calls"], ".0f")] for t in prof["top_ops"]])
        sections.append(f"### {estimator}: top {args.top} operators by self CPU time (torch.profiler, median of "
                        f"{profile_steps} Hessian steps; the profiler slows each operator a little)\n\n"
                        f"{prof['operator_calls']:.0f} operator calls per step, nested ones included\n\n{op_table}\n")
    text = (f"## One AdaHessian Hessian step, MiniLM ({n_params / 1e6:.1f}M parameters), batch {BATCH_SIZE}, length "
            f"{MAX_LENGTH}, {args.threads} threads\n\nmedians over {repeats} interleaved rounds after {warmup} warm-up "
            f"rounds; AdaHessian {ADAHESSIAN}, finite differences {args.fd_scheme}\n\n{table}\n\n"
            + "\n".join(ratio_lines) + "\n\n" + "\n".join(sections))
    write_report(out, text, {
        **provenance(args.threads, MODULE), "parameters": n_params,
        "batch_size": BATCH_SIZE, "max_seq_length": MAX_LENGTH, "adahessian": ADAHESSIAN,
        "estimators": args.estimators, "fd_scheme": args.fd_scheme, "repeats": repeats, "warmup": warmup,
        "measure_s": measure_s,
        "summary": summary, "rounds": rounds, "profiles": profiles, "schedules": schedule_lines(totals),
    })


if __name__ == "__main__":
    main()
