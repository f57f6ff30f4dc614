"""Where one AdaHessian Hessian step's extra memory goes: MiniLM, batch 16, length 64, on CPU.

    python benchmarks/memory_hessian_step.py [--threads 2] [--output_dir DIR]

Peak RSS (what ``sst2.py`` reports) says how much more a Hessian step takes, not what for.
This script runs one step of each kind under ``torch.profiler`` with ``profile_memory=True``
and replays the allocator's events in order: for each phase of the step, the tensor bytes
live at its end and the peak inside it, both counted from the start of the step (when only
the parameters and the optimizer state are live). The kinds:

    adamw step                      forward, backward, clip, update, zero_grad
    adahessian Hessian step         forward, grad (graph), Hessian-vector, clip, update, zero_grad
    adahessian Hessian step, 1/4    the Trainer's ``hessian_batch_fraction=0.25`` path: forward,
                                    grad (graph) and Hessian-vector on the first 4 rows (Hessian
                                    only), then forward and backward on all 16, clip, update

Every step is taken once before it is measured, so that the optimizer state exists and the
measured step allocates what a step in the middle of training allocates.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from profile_hessian_step import minilm_for_training, profile_parser, setup  # noqa: E402

MB = 2**20


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


def memory_by_phase(prof, phases: list[str]) -> dict[str, dict[str, float]]:
    """For each phase: MB live at its end and its peak, both above the step's start."""
    events, ranges = events_and_ranges(prof, phases)
    out, live, i = {}, 0, 0
    for phase in sorted(ranges, key=lambda p: ranges[p][0]):
        start, end = ranges[phase]
        while i < len(events) and events[i][0] < start:  # between phases (none in practice)
            live += events[i][1]
            i += 1
        peak = live
        while i < len(events) and events[i][0] <= end:
            live += events[i][1]
            peak = max(peak, live)
            i += 1
        out[phase] = {"live_at_end_mb": live / MB, "peak_mb": peak / MB}
    return out


def main() -> None:
    args = profile_parser(__doc__, "memory_hessian_step").parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile, record_function

    from hf_adahessian import AdaHessian

    batch = setup(args)
    head = {k: v[:4] for k, v in batch.items()}

    def nbytes(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / MB

    def state_mb(optimizer) -> float:
        return nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))

    def finish(optimizer, params, label):
        with label("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with label("update"):
            optimizer.step()
        with label("zero_grad"):
            optimizer.zero_grad(set_to_none=True)

    def backward_pass(model, label):
        with label("forward"):
            loss = model(**batch).loss
        with label("backward"):
            loss.backward()

    def adamw_step(model, params, optimizer, label):
        backward_pass(model, label)
        finish(optimizer, params, label)

    def hessian_pass(model, params, optimizer, rows, label, add_grad):
        with sdpa_kernel([SDPBackend.MATH]):
            with label("forward" if add_grad else "Hessian forward"):
                loss = model(**rows).loss
            with label("grad (graph)"):
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            with label("Hessian-vector"):
                optimizer.accumulate_hessian(grads=grads, add_grad=add_grad)
            del grads, loss

    def hessian_step(model, params, optimizer, label):
        optimizer.begin_hessian_accumulation()
        hessian_pass(model, params, optimizer, batch, label, add_grad=True)
        finish(optimizer, params, label)

    def quarter_hessian_step(model, params, optimizer, label):
        optimizer.begin_hessian_accumulation()
        hessian_pass(model, params, optimizer, head, label, add_grad=False)
        backward_pass(model, label)
        finish(optimizer, params, label)

    kinds = {
        "adamw step": (adamw_step, lambda ps: torch.optim.AdamW(ps, lr=1e-5)),
        "adahessian Hessian step": (hessian_step, lambda ps: AdaHessian(ps, lr=1e-3, block_size=32, seed=0)),
        "adahessian Hessian step, 1/4 of the batch": (
            quarter_hessian_step, lambda ps: AdaHessian(ps, lr=1e-3, block_size=32, seed=0)),
    }
    phases = ["Hessian forward", "forward", "grad (graph)", "Hessian-vector", "backward", "clip", "update", "zero_grad"]
    results = {}
    for kind, (step, make_optimizer) in kinds.items():
        model, params = minilm_for_training()
        optimizer = make_optimizer(params)
        step(model, params, optimizer, lambda name: contextlib.nullcontext())  # the state exists from here on
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(model, params, optimizer, record_function)
        by_phase = memory_by_phase(prof, phases)
        persistent = {"parameters_mb": nbytes(params), "optimizer_state_mb": state_mb(optimizer)}
        step_peak = max(v["peak_mb"] for v in by_phase.values())
        results[kind] = {"phases": by_phase, **persistent, "step_peak_above_start_mb": step_peak,
                         "peak_tensor_mb": persistent["parameters_mb"] + persistent["optimizer_state_mb"] + step_peak}
        print(f"{kind}: peak {step_peak:.0f} MB above the step's start", flush=True)
        del model, params, optimizer, prof

    rows = []
    for kind, r in results.items():
        for phase, m in r["phases"].items():
            rows.append([kind, phase, common.fmt(m["live_at_end_mb"], ".0f"), common.fmt(m["peak_mb"], ".0f")])
    table = common.markdown_table(["step", "phase", "live at its end, MB", "peak inside it, MB"], rows)
    base = results["adamw step"]["peak_tensor_mb"]
    totals = common.markdown_table(
        ["step", "parameters MB", "optimizer state MB", "step peak MB", "peak tensor MB", "× AdamW"],
        [[k, common.fmt(r["parameters_mb"], ".0f"), common.fmt(r["optimizer_state_mb"], ".0f"),
          common.fmt(r["step_peak_above_start_mb"], ".0f"), common.fmt(r["peak_tensor_mb"], ".0f"),
          common.fmt(r["peak_tensor_mb"] / base, ".2f")] for k, r in results.items()])
    text = (f"## Tensor memory of one step, MiniLM, batch 16, length 64 (torch.profiler, profile_memory=True)\n\n"
            f"MB above the step's start (parameters and optimizer state already live)\n\n{table}\n\n"
            f"Peak tensor memory: parameters + optimizer state + the step's peak\n\n{totals}\n")
    print("\n" + text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    common.write_json(out / "results.json", {
        "machine": common.machine_info(args.threads), "invocation": " ".join([sys.executable, *sys.argv]),
        "batch_size": 16, "max_seq_length": 64, "results": results,
    })
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
