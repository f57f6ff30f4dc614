"""AdamW and AdaHessian on a GPU: seconds per step and peak memory, bf16, through the Trainer.

    python -m benchmarks.gpu --device cuda [--models squeezebert,minilm] [--steps 50] [--batch_size 32]
                             [--seq_len 128] [--time_budget SECONDS] [--output_dir DIR]
    python -m benchmarks.gpu --device cpu --quick     # CI dry run: tiny models, 3 steps each, fp32, a temporary folder
    bash benchmarks/gpu_check.sh OUT_DIR              # on a bare GPU machine: the CUDA tests, then this

Two models built from their configs with random weights (nothing is downloaded), sequence
classification with 2 labels: a SqueezeBERT-base (squeezebert/squeezebert-uncased's config: hidden
768, 12 layers, 12 heads, intermediate 3072, vocabulary 30528, grouped q/k/v 4, post-attention 1,
intermediate and output 4) and MiniLM (all-MiniLM-L6-v2's BertConfig: hidden 384, 6 layers, 12
heads, intermediate 1536, vocabulary 30522; SDPA attention). The data are random token ids and
labels, every row full length (no padding, so no attention mask).

For each model, in this order, each configuration a fresh model from the same seed and its own
``AdaHessianTrainer`` (the stock Trainer for ``--optim adamw_torch``), ``bf16=True`` (fp32 on CPU),
the Trainer's clipping at 1.0, a linear schedule:

    adamw_torch        --optim adamw_torch (torch.optim.AdamW)
    adahessian_h1      --optim adahessian, the exact estimator, a Hessian on every step
    adahessian_h10     the same, a Hessian every 10 steps
    adahessian_h1_fd   --optim_args hessian_estimator=finite_difference, every step

so every step, the Hessian ones included, is the package's own (``hessian_pass.micro_batch``
inside ``AdaHessianTrainer.training_step``). A ``TrainerCallback`` times each optimizer step from
``on_step_begin`` to ``on_step_end`` (``torch.cuda.synchronize()`` at both ends); s/step is the
median after the warm-up steps, for interval 10 the amortised median Hessian step/10 + median
plain step·9/10. Peak memory is ``torch.cuda.max_memory_allocated()`` over the configuration (reset
before it: the model, the optimizer state, the activations). The interval-1 configurations take
one step more, profiled with ``torch.profiler`` (CPU and CUDA activity) and left out of the
timing: the top operators by self CUDA time (self CPU time on CPU).

``--time_budget``: no configuration starts after it, and one running when it passes stops at
its next step; what was measured is written, marked ``partial``. ``results.json`` is rewritten
after every configuration, so even a run killed from outside leaves one.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from . import specs
from .machine import git_state
from .options import output_dir
from .report import fmt, invocation, markdown_table, provenance, write_json, write_report

MODULE = "benchmarks.gpu"  # how it is run: python -m MODULE
MODELS = ("squeezebert", "minilm")
CONFIGURATIONS = (
    specs.adamw(5e-5, ()),
    specs.adahessian(1, 0.03, ()),
    specs.adahessian(10, 0.03, ()),
    specs.adahessian(1, 0.03, (), hessian_estimator="finite_difference"),
)
FULL = {"steps": 50, "warmup": 5, "batch_size": 32, "seq_len": 128}
QUICK = {"steps": 3, "warmup": 1, "batch_size": 4, "seq_len": 16}
TOP = 15
MB = 2**20


# ----------------------------------------------------------------------------- models and data


def model_config(name: str, quick: bool):
    """The model's config: the real sizes, or a tiny one of the same kind (``--quick``)."""
    from transformers import BertConfig, SqueezeBertConfig

    if name == "squeezebert":
        sizes = (dict(vocab_size=100, hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, q_groups=2, k_groups=2, v_groups=2, intermediate_groups=2, output_groups=2)
                 if quick else
                 dict(vocab_size=30528, hidden_size=768, embedding_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, q_groups=4, k_groups=4, v_groups=4, intermediate_groups=4, output_groups=4))
        return SqueezeBertConfig(num_labels=2, max_position_embeddings=512, post_attention_groups=1, **sizes)
    sizes = (dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
             if quick else
             dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
    return BertConfig(num_labels=2, max_position_embeddings=512, **sizes)


def build_model(name: str, quick: bool):
    from transformers import BertForSequenceClassification, SqueezeBertForSequenceClassification

    config = model_config(name, quick)
    torch.manual_seed(0)
    cls = SqueezeBertForSequenceClassification if name == "squeezebert" else BertForSequenceClassification
    return cls(config)


class RandomBatches(torch.utils.data.Dataset):
    """``rows`` random sequences of ``seq_len`` token ids (none special) and random binary labels."""

    def __init__(self, rows: int, seq_len: int, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(5, vocab_size, (rows, seq_len), generator=gen)
        self.labels = torch.randint(0, 2, (rows,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


# ----------------------------------------------------------------------------- timing and profiles


class StepClock(TrainerCallback):
    """Seconds of every optimizer step and whether it carried a Hessian; one step profiled; the deadline.

    ``profile_step`` (1-based) runs under ``torch.profiler`` and is not timed. At ``deadline``
    (``time.monotonic()``) training stops at the end of the step.
    """

    def __init__(self, cuda: bool, deadline: float, profile_step: int | None = None):
        self.cuda, self.deadline, self.profile_step = cuda, deadline, profile_step
        self.seconds: list[float] = []
        self.hessian: list[bool] = []
        self.profile: dict | None = None
        self.truncated = False
        self._prof = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        self._carries_hessian = bool(getattr(inner, "is_hessian_step", lambda: False)())
        if state.global_step + 1 == self.profile_step:
            self._prof = _start_profiler(self.cuda)
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        elapsed = time.perf_counter() - self._start
        if self._prof is not None:
            self.profile = _finish_profile(self._prof, self.cuda, self._carries_hessian, elapsed)
            self._prof = None
        else:
            self.seconds.append(elapsed)
            self.hessian.append(self._carries_hessian)
        if time.monotonic() >= self.deadline and not control.should_training_stop:
            self.truncated = True
            control.should_training_stop = True


def _start_profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    try:
        prof.start()
    except Exception as err:  # a profiler that cannot start must not cost the configuration
        return _FailedProfile(err)
    return prof


class _FailedProfile:
    def __init__(self, err: Exception):
        self.error = f"{type(err).__name__}: {err}"


def _finish_profile(prof, cuda: bool, hessian: bool, seconds: float) -> dict:
    """The profiled step's top operators by self CUDA time (self CPU time on CPU), and its top kernels."""
    if isinstance(prof, _FailedProfile):
        return {"error": prof.error}
    try:
        prof.stop()
        events = list(prof.key_averages())
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    on_device, operators = [], []
    for e in events:
        (operators if "CPU" in str(getattr(e, "device_type", "CPU")) else on_device).append(e)
    # Kernels are the device's time once; an operator's self CUDA time is that of the kernels it launched.
    total = sum(getattr(e, key) for e in (on_device if cuda else operators)) or 1.0

    def rows(es):
        es = sorted(es, key=lambda e: getattr(e, key), reverse=True)[:TOP]
        return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
                for e in es]

    return {"carried_hessian": hessian, "wall_s_under_profiler": seconds,
            "sorted_by": "self CUDA time" if cuda else "self CPU time", "total_ms": total / 1e3,
            "top_ops": rows(operators), "top_kernels": rows(on_device)}


def step_statistics(seconds: list[float], hessian: list[bool], warmup: int, interval: int | None) -> dict:
    """Medians of the Hessian and the plain steps after ``warmup``; s/step weighted by the interval.

    A kind of step that occurs only in the warm-up (interval 10 over a few steps) takes its
    median from there, and says so.
    """
    out = {"warmup": warmup, "measured_steps": max(0, len(seconds) - warmup)}
    for kind, flag in (("hessian", True), ("plain", False)):
        after = [t for i, (t, h) in enumerate(zip(seconds, hessian)) if i >= warmup and h == flag]
        during = [t for t, h in zip(seconds[:warmup], hessian[:warmup]) if h == flag]
        xs = after or during
        out[f"median_{kind}_step_s"] = statistics.median(xs) if xs else None
        out[f"{kind}_steps"] = len(xs)
        out[f"{kind}_median_from_warmup"] = bool(xs) and not after
    h, p = out["median_hessian_step_s"], out["median_plain_step_s"]
    if interval is None:
        per_step = p
    elif interval == 1:
        per_step = h
    else:
        per_step = None if h is None or p is None else h / interval + p * (interval - 1) / interval
    out["seconds_per_step"] = per_step
    out["mean_step_s"] = statistics.fmean(seconds[warmup:]) if len(seconds) > warmup else None
    return out


# ----------------------------------------------------------------------------- one configuration


def _training_args(spec, run_dir: Path, steps: int, batch_size: int, cuda: bool):
    from hf_adahessian import AdaHessianTrainingArguments

    flags = spec.script_args()  # ["--optim", NAME] or ["--optim", NAME, "--optim_args", "k=v,..."]
    return AdaHessianTrainingArguments(
        output_dir=str(run_dir), optim=flags[1], optim_args=flags[3] if len(flags) > 3 else None,
        learning_rate=spec.lr, per_device_train_batch_size=batch_size, max_steps=steps, bf16=cuda, use_cpu=not cuda,
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_steps=min(10, steps),
        # The NaN/inf filter reads the loss on the host after every micro-batch, a sync inside the step.
        logging_nan_inf_filter=False, dataloader_num_workers=0, dataloader_pin_memory=cuda,
    )


def _fresh_memory(cuda: bool) -> int | None:
    gc.collect()
    if not cuda:
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def run_configuration(model_name: str, spec, setting: dict, cuda: bool, deadline: float, run_dir: Path,
                      quick: bool) -> dict:
    from hf_adahessian import AdaHessianTrainer

    interval = spec.hessian_interval
    estimator = None if interval is None else spec.optim_args["hessian_estimator"]
    profiled = interval == 1
    steps = setting["steps"] + (1 if profiled else 0)
    record = {"model": model_name, "optimizer": spec.name, "optim": spec.optim, "lr": spec.lr,
              "hessian_interval": interval, "estimator": estimator, "optim_args": dict(spec.optim_args)}
    data = RandomBatches(setting["batch_size"] * steps, setting["seq_len"], model_config(model_name, quick).vocab_size)
    start_memory = _fresh_memory(cuda)
    model = build_model(model_name, quick)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    clock = StepClock(cuda, deadline, profile_step=steps if profiled else None)
    trainer = AdaHessianTrainer(model=model, args=_training_args(spec, run_dir, steps, setting["batch_size"], cuda),
                                train_dataset=data, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # the logs go to results.json, not one dict per line on stdout
    start = time.perf_counter()
    trainer.train()
    record["train_wall_s"] = time.perf_counter() - start
    record.update(step_statistics(clock.seconds, clock.hessian, setting["warmup"], interval))
    record.update(steps_timed=len(clock.seconds), step_seconds=clock.seconds, step_carried_hessian=clock.hessian,
                  truncated=clock.truncated, profile=clock.profile)
    record["memory_at_start_mb"] = None if start_memory is None else start_memory / MB
    record["peak_memory_mb"] = torch.cuda.max_memory_allocated() / MB if cuda else None
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record["losses"] = losses
    record["last_loss"] = losses[-1] if losses else None
    record["finite_loss"] = all(math.isfinite(x) for x in losses)
    record["counters"] = trainer.adahessian.counters if trainer.adahessian is not None else None
    record["mixed_precision"] = trainer.accelerator.mixed_precision
    del trainer, model, clock
    _fresh_memory(cuda)
    return record


def with_ratios(records: list[dict]) -> None:
    """Each configuration's s/step and peak memory over its model's AdamW run (None where either is missing)."""
    base = {r["model"]: r for r in records if r.get("optimizer") == specs.BASELINE and "error" not in r}

    def ratio(r, key):
        b = base.get(r["model"])
        if b is None or r.get(key) is None or not b.get(key):
            return None
        return r[key] / b[key]

    for r in records:
        r["ratios"] = {"time_per_step": ratio(r, "seconds_per_step"), "peak_memory": ratio(r, "peak_memory_mb")}


# ----------------------------------------------------------------------------- report


def device_info(cuda: bool) -> dict:
    import accelerate
    import transformers

    import hf_adahessian

    info = {"device": "cuda" if cuda else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "hf_adahessian": hf_adahessian.__version__}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=torch.cuda.get_device_name(0), gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), gpu_multiprocessors=props.multi_processor_count,
                    cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def run_provenance(threads: int, cuda: bool) -> dict:
    try:
        meta = provenance(threads, MODULE)
    except ImportError as err:  # machine_info also reads datasets' version, which a bare GPU image may lack
        meta = {"git": git_state(), "invocation": invocation(MODULE),
                "machine": {"python": platform.python_version(), "platform": platform.platform(),
                            "note": f"machine_info unavailable: {err}"}}
    meta["machine"].update(device_info(cuda))
    if meta["git"].get("commit") is None and os.environ.get("GIT_COMMIT"):
        # A copy of the working tree without .git (a lent GPU machine): the command says which commit it is.
        dirty = {"true": True, "false": False}.get(os.environ.get("GIT_DIRTY", "").lower())
        meta["git"] = {"commit": os.environ["GIT_COMMIT"], "dirty": dirty, "source": "GIT_COMMIT, GIT_DIRTY"}
    return meta


def results_table(records: list[dict]) -> str:
    headers = ["model", "optimizer", "Hessian every", "estimator", "steps timed", "s/step", "× AdamW",
               "median Hessian step s", "median plain step s", "peak MB", "× AdamW", "last loss"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["model"], r["optimizer"], fmt(r.get("hessian_interval"), "d"), fmt(r.get("estimator")),
                         f"FAILED: {r['error']}"] + [""] * (len(headers) - 5))
            continue
        ra = r["ratios"]
        steps = f"{r['steps_timed']}" + (" (stopped by the time budget)" if r["truncated"] else "")
        rows.append([r["model"], r["optimizer"], fmt(r["hessian_interval"], "d"), fmt(r["estimator"]), steps,
                     fmt(r["seconds_per_step"], ".4f"), fmt(ra["time_per_step"], ".2f"),
                     fmt(r["median_hessian_step_s"], ".4f"), fmt(r["median_plain_step_s"], ".4f"),
                     fmt(r["peak_memory_mb"], ".0f"), fmt(ra["peak_memory"], ".2f"), fmt(r["last_loss"], ".4f")])
    return markdown_table(headers, rows)


def profile_sections(records: list[dict]) -> str:
    sections = []
    for r in records:
        prof = r.get("profile")
        if not prof:
            continue
        title = f"### {r['model']}, {r['optimizer']}: one Hessian step under torch.profiler"
        if "error" in prof:
            sections.append(f"{title}\n\nthe profiler failed: {prof['error']}\n")
            continue
        table = markdown_table(["operator", f"{prof['sorted_by']}, ms", "share", "calls"],
                               [[o["op"], fmt(o["self_ms"], ".2f"), fmt(o["share"], ".1%"), fmt(o["calls"], "d")]
                                for o in prof["top_ops"]])
        sections.append(f"{title} (top {TOP} operators by {prof['sorted_by']}; shares of {fmt(prof['total_ms'], '.1f')} "
                        f"ms; {fmt(prof['wall_s_under_profiler'], '.3f')} s under the profiler)\n\n{table}\n")
    return "\n".join(sections)


def report_text(meta: dict) -> str:
    machine, s = meta["machine"], meta["setting"]
    where = machine.get("gpu_name") or f"CPU ({machine.get('cpu_model', platform.processor() or 'unknown')})"
    partial = ""
    if meta["partial"]:
        partial = ("\n**Partial**: " + "; ".join(meta["partial_reasons"]) + ".\n")
    return (f"## AdamW and AdaHessian on {where}: seconds per step and peak memory, {meta['precision']}, batch "
            f"{s['batch_size']}, length {s['seq_len']}\n\n"
            f"{s['steps']} steps per configuration through AdaHessianTrainer, medians after a warm-up of "
            f"{s['warmup']} steps (interval 10: median Hessian step/10 + median plain step·9/10); peak: "
            f"{'torch.cuda.max_memory_allocated() over the configuration' if meta['device'] == 'cuda' else 'not measured on CPU'}; "
            f"random weights from the models' configs, random tokens and labels; torch {machine['torch']}, "
            f"transformers {machine['transformers']}, commit {meta['git'].get('commit')}"
            f"{' (tracked files modified)' if meta['git'].get('dirty') else ''}.\n{partial}\n"
            f"{results_table(meta['configurations'])}\n\n{profile_sections(meta['configurations'])}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when torch sees one, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny models of the same kinds, 3 steps each (the CPU dry run CI makes), a temporary folder")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: %(default)s")
    for name, full in FULL.items():
        p.add_argument(f"--{name}", type=int, help=f"default {full} (quick {QUICK[name]})")
    p.add_argument("--time_budget", type=float, default=math.inf,
                   help="seconds after which no configuration starts and a running one stops at its next step; "
                        "what was measured is written, marked partial (default: none)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default 2; quick 1: for tiny models one thread is fastest, and two "
                        "spin-waiting on a busy 2-core machine were 10-40x slower)")
    p.add_argument("--output_dir", type=Path,
                   help="where table.md and results.json go (default: benchmarks/results/gpu/comparison/; with "
                        "--quick a fresh temporary folder, printed)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False here; use --device cpu (with --quick)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        p.error(f"--models is a subset of {','.join(MODELS)}; got {args.models!r}")
    args.models = models
    defaults = QUICK if args.quick else FULL
    args.setting = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    args.threads = args.threads or (1 if args.quick else 2)
    return args


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    deadline = started + args.time_budget
    out = output_dir(args, "gpu", "comparison")
    meta = {**run_provenance(args.threads, cuda), "device": args.device, "precision": "bf16" if cuda else "fp32",
            "setting": args.setting, "models": args.models,
            "time_budget_s": None if math.isinf(args.time_budget) else args.time_budget,
            "configurations": [], "not_run": [], "partial": True, "finished": False}
    records = meta["configurations"]
    with tempfile.TemporaryDirectory(prefix="hf-adahessian-gpu-") as scratch:
        for model_name in args.models:
            for spec in CONFIGURATIONS:
                name = f"{model_name}/{spec.name}"
                if time.monotonic() >= deadline:
                    meta["not_run"].append(name)
                    continue
                print(f"{name}: {args.setting['steps']} steps ...", flush=True)
                try:
                    record = run_configuration(model_name, spec, args.setting, cuda, deadline,
                                               Path(scratch) / model_name / spec.name, args.quick)
                except Exception as err:  # one failing configuration must not lose the others
                    traceback.print_exc()
                    record = {"model": model_name, "optimizer": spec.name, "hessian_interval": spec.hessian_interval,
                              "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
                    _fresh_memory(cuda)
                records.append(record)
                with_ratios(records)
                print(f"{name}: s/step {fmt(record.get('seconds_per_step'), '.4f')}, peak "
                      f"{fmt(record.get('peak_memory_mb'), '.0f')} MB", flush=True)
                meta["elapsed_s"] = time.monotonic() - started
                write_json(out / "results.json", meta)  # what there is so far, should the run be killed
    reasons = []
    if meta["not_run"]:
        reasons.append(f"the time budget ({args.time_budget:g} s) ran out before {', '.join(meta['not_run'])}")
    stopped = [f"{r['model']}/{r['optimizer']}" for r in records if r.get("truncated")]
    if stopped:
        reasons.append(f"the time budget stopped {', '.join(stopped)} early")
    failed = [f"{r['model']}/{r['optimizer']}" for r in records if "error" in r]
    if failed:
        reasons.append(f"{', '.join(failed)} failed")
    meta.update(partial=bool(reasons), partial_reasons=reasons, finished=True,
                elapsed_s=time.monotonic() - started)
    write_report(out, report_text(meta), meta)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
