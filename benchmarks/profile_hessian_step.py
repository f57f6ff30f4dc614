"""Where one AdaHessian Hessian step spends its time: MiniLM, batch 16, length 64, on CPU.

    python benchmarks/profile_hessian_step.py [--repeats 15] [--threads 2] [--output_dir DIR]

The step is taken apart as ``AdaHessianTrainer`` runs it, with plain timers around each phase:

    forward          the model's loss (SDPA's math kernel, which has a double backward)
    grad (graph)     torch.autograd.grad(loss, params, create_graph=True)
    Hessian-vector   optimizer.accumulate_hessian(grads=...): Rademacher probes, Hz through the
                     gradients' graph, z ⊙ Hz into the step's estimate, the gradients into .grad
    clip             clip_grad_norm_(1.0), as the Trainer does
    update           optimizer.step(): |D|, block averages (32), finiteness check, the update
    zero_grad        set_to_none

In the same process and interleaved round by round (so that another process on the
cores slows all of them alike), the same batch through an AdamW step (forward, backward,
clip, step, zero_grad) and an AdaHessian step without a Hessian (the steps between two
estimates when hessian_interval > 1). On this kind of machine a fresh large allocation is
expensive (page faults) and other processes come and go, so each phase is measured
``--repeats`` times after ``--warmup`` rounds and the medians are reported (the first,
cold, round is kept in the JSON). A ``torch.profiler`` trace of ``--profile_steps`` Hessian
steps then gives the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def load_batch(tokenizer, data_dir: Path, n: int = 16, length: int = 64):
    import torch

    sentences, labels = [], []
    with open(common.require_data(data_dir, "sst2", ("train.jsonl",)) / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            sentences.append(row["sentence"])
            labels.append(row["label"])
            if len(sentences) == n:
                break
    batch = dict(tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    return batch


def profile_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options both step profiles take: threads, output folder, data folder."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output_dir", default=str(common.HERE / "results" / name))
    p.add_argument("--data_dir", type=Path, default=common.DATA, help="the shared data (default: ../shared/data)")
    return p


def setup(args):
    """Threads, quiet transformers, a fixed seed; the profiled batch of 16 SST-2 sentences."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sst2 import model_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return load_batch(AutoTokenizer.from_pretrained(model_dir()), args.data_dir)


def minilm_for_training():
    """The pretrained MiniLM with a fresh 2-label head, in train mode, and its trainable parameters."""
    from transformers import AutoModelForSequenceClassification

    from sst2 import model_dir

    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    p = profile_parser(__doc__, "profile_hessian_step")
    p.add_argument("--repeats", type=int, default=15, help="measured rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="rounds left out (default: %(default)s)")
    p.add_argument("--profile_steps", type=int, default=5, help="Hessian steps under torch.profiler (median)")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the peer packages' Hessian steps, interleaved (default: on)")
    args = p.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile, record_function

    from hf_adahessian import AdaHessian

    batch = setup(args)
    m_adam, p_adam = minilm_for_training()
    m_ah, p_ah = minilm_for_training()
    adamw = torch.optim.AdamW(p_adam, lr=1e-5)
    # interval 2: Hessian and plain steps alternate, so each round measures one of each.
    adahessian = AdaHessian(p_ah, lr=1e-3, hessian_interval=2, block_size=32, seed=0)
    n_params = sum(p.numel() for p in p_ah)

    def timed(times: dict, key: str, fn):
        t = time.perf_counter()
        out = fn()
        times[key] = time.perf_counter() - t
        return out

    def hessian_step(label=lambda name: contextlib.nullcontext()):
        assert adahessian.is_hessian_step()
        t = {}
        adahessian.begin_hessian_accumulation()
        with sdpa_kernel([SDPBackend.MATH]):
            with label("forward"):
                loss = timed(t, "forward", lambda: m_ah(**batch).loss)
            with label("grad (graph)"):
                grads = timed(t, "grad (graph)",
                              lambda: torch.autograd.grad(loss, p_ah, create_graph=True, allow_unused=True))
            with label("Hessian-vector"):
                timed(t, "Hessian-vector", lambda: adahessian.accumulate_hessian(grads=grads))
        del grads, loss
        with label("clip"):
            timed(t, "clip", lambda: torch.nn.utils.clip_grad_norm_(p_ah, 1.0))
        with label("update"):
            timed(t, "update", adahessian.step)
        with label("zero_grad"):
            timed(t, "zero_grad", lambda: adahessian.zero_grad(set_to_none=True))
        return t

    def backward_step(model, params, optimizer, create_graph=False):
        """forward, backward, clip, step(), zero_grad: AdamW's step, ours between two estimates, and
        the peers' Hessian steps (backward(create_graph=True); their step() makes probes and Hz)."""
        def step():
            t = {}
            with sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext():
                loss = timed(t, "forward", lambda: model(**batch).loss)
                timed(t, "backward (graph)" if create_graph else "backward",
                      lambda: loss.backward(create_graph=create_graph))
            del loss
            timed(t, "clip", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
            timed(t, "update (with Hessian)" if create_graph else "update", optimizer.step)
            timed(t, "zero_grad", lambda: optimizer.zero_grad(set_to_none=True))
            return t
        return step

    adamw_step = backward_step(m_adam, p_adam, adamw)
    between_estimates = backward_step(m_ah, p_ah, adahessian)

    def plain_step():
        assert not adahessian.is_hessian_step()
        return between_estimates()

    kinds = {"adamw step": adamw_step, "adahessian Hessian step": hessian_step,
             "adahessian step without Hessian": plain_step}
    if args.peers:
        # The peer packages' Hessian steps, interleaved with ours: a ratio that one busy moment
        # cannot tilt, unlike two runs of sst2.py minutes apart.
        from runner import build_peer

        for name in ("torch_optimizer_adahessian", "pytorch_optimizer_adahessian", "sophiah_h1"):
            model, params = minilm_for_training()
            kinds[f"{name} Hessian step"] = backward_step(model, params, build_peer(common.PEERS[name], params, lr=1e-3),
                                                          create_graph=True)
    rounds = {k: [] for k in kinds}
    start = time.perf_counter()
    for i in range(args.warmup + args.repeats):
        for kind, fn in kinds.items():
            t = fn()
            t["total"] = sum(t.values())
            rounds[kind].append(t)
        print(f"round {i + 1}/{args.warmup + args.repeats}: " + ", ".join(
            f"{k} {rounds[k][-1]['total']:.3f}s" for k in kinds), flush=True)
    measure_s = time.perf_counter() - start

    summary = {}
    for kind, rs in rounds.items():
        measured = rs[args.warmup:]
        summary[kind] = {
            phase: {"median_s": statistics.median(r[phase] for r in measured),
                    "min_s": min(r[phase] for r in measured),
                    "first_round_s": rs[0][phase]}
            for phase in rs[0]
        }
    # The Hessian step's phases as one line per phase; the ratios to AdamW's total.
    adam_total = summary["adamw step"]["total"]["median_s"]
    rows = []
    for kind, phases in summary.items():
        for phase, s in phases.items():
            rows.append([kind, phase, common.fmt(s["median_s"]), common.fmt(s["min_s"]), common.fmt(s["first_round_s"]),
                         common.fmt(s["median_s"] / adam_total, ".2f")])
    table = common.markdown_table(["step", "phase", "median s", "min s", "cold (1st) s", "× AdamW step"], rows)

    # torch.profiler over a few more Hessian steps, one profiler each (the plain steps that keep
    # interval 2 alternating run outside them); per operator, the median over those steps.
    phases = ("forward", "grad (graph)", "Hessian-vector", "clip", "update", "zero_grad")
    prof_records, per_step = [], []
    for _ in range(args.profile_steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prof_records.append(hessian_step(record_function))
        plain_step()
        per_step.append({e.key: (e.self_cpu_time_total / 1e3, e.cpu_time_total / 1e3, e.count)
                         for e in prof.key_averages()})
    keys = {k for step in per_step for k in step}

    def median_of(key, i):
        return statistics.median(step.get(key, (0.0, 0.0, 0))[i] for step in per_step)

    ranges = {k: median_of(k, 1) for k in phases if k in keys}
    ops = [{"op": k, "self_cpu_ms": median_of(k, 0), "cpu_total_ms": median_of(k, 1), "calls": median_of(k, 2)}
           for k in keys if k not in phases]
    top = sorted(ops, key=lambda o: o["self_cpu_ms"], reverse=True)[: args.top]
    total_self = sum(o["self_cpu_ms"] for o in ops) or 1.0
    op_table = common.markdown_table(
        ["operator", "self CPU ms per Hessian step", "share", "calls"],
        [[t["op"], common.fmt(t["self_cpu_ms"], ".1f"), common.fmt(t["self_cpu_ms"] / total_self, ".1%"),
          common.fmt(t["calls"], ".0f")] for t in top])

    ours = summary["adahessian Hessian step"]["total"]["median_s"]
    peer_lines = "".join(f"{kind} / ours: {phases['total']['median_s'] / ours:.3f}×\n" for kind, phases in summary.items()
                         if kind.endswith("Hessian step") and not kind.startswith("adahessian"))
    text = (f"## One AdaHessian Hessian step, MiniLM ({n_params / 1e6:.1f}M parameters), batch 16, length 64, "
            f"{args.threads} threads\n\nmedians over {args.repeats} interleaved rounds after {args.warmup} warm-up "
            f"rounds\n\n{table}\n\nHessian step / AdamW step: "
            f"{summary['adahessian Hessian step']['total']['median_s'] / adam_total:.2f}×; step without Hessian / "
            f"AdamW step: {summary['adahessian step without Hessian']['total']['median_s'] / adam_total:.2f}×\n\n"
            f"{peer_lines}\n"
            f"### Top {args.top} operators by self CPU time (torch.profiler, median of {args.profile_steps} Hessian "
            f"steps; the profiler slows each operator a little)\n\n{op_table}\n")
    print("\n" + text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    common.write_json(out / "results.json", {
        "machine": common.machine_info(args.threads), "invocation": " ".join([sys.executable, *sys.argv]),
        "parameters": n_params, "batch_size": 16, "max_seq_length": 64, "repeats": args.repeats,
        "warmup": args.warmup, "measure_s": measure_s, "summary": summary, "rounds": rounds,
        "profiler_phase_cpu_ms": ranges, "profiler_total_self_cpu_ms": total_self,
        "profiler_step_timers": prof_records, "top_ops": top,
    })
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
