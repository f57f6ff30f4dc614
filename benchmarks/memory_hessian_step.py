"""Where one AdaHessian Hessian step's extra memory goes: MiniLM, batch 16, length 64, on CPU.

    python -m benchmarks.memory_hessian_step [--estimators exact,finite_difference] [--output_dir DIR]
    python -m benchmarks.memory_hessian_step --quick     # the same, written to a temporary folder (CI)

Peak RSS (what the comparisons report) says how much more a Hessian step takes, not what
for. This profile runs one step of each kind under ``torch.profiler`` with
``profile_memory=True`` and replays the allocator's events in order: for each phase of the
step, the tensor bytes live at its end and the peak inside it, both counted from the start of
the step (when only the parameters and the optimizer state are live). The steps are the
package's own pieces put together phase by phase (``steps.py``):

    adamw step                                   forward, backward, clip, update, zero_grad
    adahessian exact Hessian step                forward, grad (graph), Hessian-vector, clip, update, zero_grad
    adahessian exact Hessian step, forward over reverse
                                                 forward (dual): a forward on θ + z·ε (forward-mode tangents);
                                                 grad (dual): an ordinary backward, every product with its
                                                 tangent, so g and Hz at once; Hessian-vector: Hz into the
                                                 estimate, g into .grad; clip, update, zero_grad
    adahessian exact Hessian step, 1/4 of the batch
                                                 the Trainer's hessian_batch_fraction=0.25 path: Hessian
                                                 forward, grad (graph) and Hessian-vector on the first 4 rows
                                                 (Hessian only), then forward and backward on all 16, ...
    adahessian finite-difference Hessian step    perturb θ+εz, forward and grad at θ+εz, g(θ+εz) into the estimate,
                                                 restore θ (the same at θ−εz with --fd_scheme central),
                                                 forward, backward, difference, clip, update, ...

Every step is taken once before it is measured, so that the optimizer state exists and the
measured step allocates what a step in the middle of training allocates.
"""

from __future__ import annotations

from . import steps
from .minilm import BATCH_SIZE, MAX_LENGTH, minilm_for_training, setup
from .options import output_dir, profile_parser
from .report import fmt, markdown_table, provenance, write_report

MODULE = "benchmarks.memory_hessian_step"  # how it is run: python -m MODULE
MB = 2**20
ADAHESSIAN = {"lr": 1e-3, "block_size": 32, "seed": 0, "hessian_interval": 1}
SIXTEENTH = 1 / 16  # one row of the batch: the every-step recipe
CHUNKS = 4
QUARTER = 0.25


def events_and_ranges(prof, phases) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """In one walk of the profiler's tree: (time ns, bytes: + allocated / - freed) of every CPU
    allocation, in time order, and the (start, end) ns of each labelled phase."""
    events, ranges = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__.endswith("Allocation") and str(fields.device) == "cpu":
            events.append((node.start_time_ns, fields.alloc_size))
        elif node.name in phases and node.name not in ranges:
            ranges[node.name] = (node.start_time_ns, node.end_time_ns)
        stack.extend(node.children)
    return sorted(events), ranges


def memory_by_phase(prof, phases) -> dict[str, dict[str, float]]:
    """For each phase: MB live at its end and its peak, both above the step's start."""
    events, ranges = events_and_ranges(prof, phases)
    out, live, i = {}, 0, 0
    for phase in sorted(ranges, key=lambda p: ranges[p][0]):
        start, end = ranges[phase]
        while i < len(events) and events[i][0] < start:  # between phases
            live += events[i][1]
            i += 1
        peak = live
        while i < len(events) and events[i][0] <= end:
            live += events[i][1]
            peak = max(peak, live)
            i += 1
        out[phase] = {"live_at_end_mb": live / MB, "peak_mb": peak / MB}
    return out


def step_kinds(batch: dict, estimators: list[str], fd_scheme: str) -> dict:
    """{kind: (step(model, params, optimizer, phase), make_optimizer(params))}."""
    import torch

    from hf_adahessian import AdaHessian

    kinds = {"adamw step": (lambda m, p, opt, phase: steps.backward_step(m, batch, opt, p, phase),
                            lambda p: torch.optim.AdamW(p, lr=1e-5))}
    if "exact" in estimators:
        exact = lambda p: AdaHessian(p, hessian_estimator="exact", **ADAHESSIAN)  # noqa: E731
        kinds["adahessian exact Hessian step"] = (
            lambda m, p, opt, phase: steps.exact_hessian_step(m, batch, opt, phase), exact)
        kinds[f"adahessian exact Hessian step, 1/{round(1 / QUARTER)} of the batch"] = (
            lambda m, p, opt, phase: steps.sub_batch_hessian_step(m, batch, opt, QUARTER, phase), exact)
        kinds[f"adahessian exact Hessian step in {CHUNKS} chunks"] = (
            lambda m, p, opt, phase: steps.chunked_hessian_step(m, batch, opt, CHUNKS, phase), exact)
        kinds["adahessian exact Hessian step, forward over reverse"] = (
            lambda m, p, opt, phase: steps.forward_over_reverse_hessian_step(m, batch, opt, phase), exact)
    if "finite_difference" in estimators:
        fd = lambda p: AdaHessian(p, hessian_estimator="finite_difference", fd_scheme=fd_scheme, **ADAHESSIAN)  # noqa: E731
        kinds["adahessian finite-difference Hessian step"] = (
            lambda m, p, opt, phase: steps.finite_difference_hessian_step(m, batch, opt, phase), fd)
        kinds[f"adahessian finite-difference Hessian step, 1/{round(1 / SIXTEENTH)} of the batch"] = (
            lambda m, p, opt, phase: steps.fd_sub_batch_hessian_step(m, batch, opt, SIXTEENTH, phase), fd)
    return kinds


def measure(step, make_optimizer) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    def nbytes(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / MB

    model, params = minilm_for_training()
    optimizer = make_optimizer(params)
    step(model, params, optimizer, steps.no_phase)  # the state exists from here on
    timer = steps.PhaseTimer(ranges=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, params, optimizer, timer)
    by_phase = memory_by_phase(prof, set(timer.seconds))
    state = nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    step_peak = max(v["peak_mb"] for v in by_phase.values())
    return {"phases": by_phase, "parameters_mb": nbytes(params), "optimizer_state_mb": state,
            "step_peak_above_start_mb": step_peak, "peak_tensor_mb": nbytes(params) + state + step_peak}


def main() -> None:
    args = profile_parser(MODULE, __doc__).parse_args()
    batch = setup(args.threads, args.data_dir)
    out = output_dir(args, "sst2", "memory")
    results = {}
    for kind, (step, make_optimizer) in step_kinds(batch, args.estimators, args.fd_scheme).items():
        results[kind] = measure(step, make_optimizer)
        print(f"{kind}: peak {results[kind]['step_peak_above_start_mb']:.0f} MB above the step's start", flush=True)

    rows = [[kind, phase, fmt(m["live_at_end_mb"], ".0f"), fmt(m["peak_mb"], ".0f")]
            for kind, r in results.items() for phase, m in r["phases"].items()]
    table = markdown_table(["step", "phase", "live at its end, MB", "peak inside it, MB"], rows)
    base = results["adamw step"]["peak_tensor_mb"]
    totals = markdown_table(
        ["step", "parameters MB", "optimizer state MB", "step peak MB", "peak tensor MB", "× AdamW"],
        [[k, fmt(r["parameters_mb"], ".0f"), fmt(r["optimizer_state_mb"], ".0f"),
          fmt(r["step_peak_above_start_mb"], ".0f"), fmt(r["peak_tensor_mb"], ".0f"),
          fmt(r["peak_tensor_mb"] / base, ".2f")] for k, r in results.items()])
    text = (f"## Tensor memory of one step, MiniLM, batch {BATCH_SIZE}, length {MAX_LENGTH} (torch.profiler, "
            f"profile_memory=True)\n\nMB above the step's start (parameters and optimizer state already live); "
            f"AdaHessian {ADAHESSIAN}, finite differences {args.fd_scheme}\n\n{table}\n\n"
            f"Peak tensor memory: parameters + optimizer state + the step's "
            f"peak\n\n{totals}\n")
    write_report(out, text, {
        **provenance(args.threads, MODULE), "batch_size": BATCH_SIZE,
        "max_seq_length": MAX_LENGTH, "adahessian": ADAHESSIAN, "estimators": args.estimators,
        "fd_scheme": args.fd_scheme, "results": results,
    })


if __name__ == "__main__":
    main()
