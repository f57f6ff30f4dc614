"""Run ``run_glue.py`` / ``run_translation.py`` unmodified, instrumented, in this process.

    python benchmarks/runner.py --result R.json [--loop SPEC_JSON] -- run_glue.py ARGS...

The scripts build ``hf_adahessian.AdaHessianTrainer`` (or the Seq2Seq one); before they
are imported, those names are pointed at subclasses that

* time every optimizer step with a ``TrainerCallback`` (``on_step_begin`` -> ``on_step_end``:
  forward, backward or Hessian step, clipping, ``optimizer.step()``, scheduler, zero_grad),
  in wall-clock seconds (``perf_counter``) and in CPU seconds of this process (``process_time``);
* record each step's training loss, whether it carried a Hessian, and a fingerprint of
  its batch (so that runs can be checked to have seen the same batches in the same order);
* record RSS right after the model is loaded and when the Trainer is built (data tokenized too),
  and the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) when training starts and ends;
* with ``--loop``, replace ``train()`` by a plain PyTorch loop for an optimizer that is not a
  Trainer optimizer (``loss.backward(create_graph=True)`` then ``step()``), fed by the
  Trainer's own train dataloader, with the Trainer's linear schedule and clipping, timed with
  ``time.perf_counter`` around the same phases.

Evaluation stays the script's own. The record is written as JSON even if the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import resource
import runpy
import sys
import time
import traceback
from pathlib import Path

import torch

RECORD: dict = {"step_times": [], "step_cpu_times": [], "hessian": [], "losses": [], "wall_s": [], "fingerprints": [],
                "phases": []}
FINGERPRINT_STEPS = 50


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fingerprint(inputs) -> str:
    h = hashlib.sha1()
    for key in ("input_ids", "labels"):
        t = inputs.get(key) if hasattr(inputs, "get") else None
        if t is not None:
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _train_begin():
    RECORD["rss_train_begin_mb"] = rss_mb()
    RECORD["peak_rss_before_train_mb"] = peak_rss_mb()
    RECORD["_t0"] = time.perf_counter()


def _train_end(optimizer=None):
    RECORD["peak_rss_train_mb"] = peak_rss_mb()
    load = RECORD.get("rss_after_model_load_mb", RECORD["rss_at_trainer_init_mb"])
    RECORD["rss_increment_mb"] = RECORD["peak_rss_train_mb"] - load
    RECORD["train_wall_s"] = time.perf_counter() - RECORD.pop("_t0")
    counters = getattr(_unwrap(optimizer), "counters", None)
    if counters is not None:
        RECORD["optimizer_counters"] = dict(counters)


def _record_step(seconds: float, cpu_seconds: float, hessian: bool, loss: float | None = None):
    RECORD["step_times"].append(seconds)
    RECORD["step_cpu_times"].append(cpu_seconds)
    RECORD["hessian"].append(bool(hessian))
    RECORD["wall_s"].append(time.perf_counter() - RECORD["_t0"])
    if loss is not None:
        RECORD["losses"].append(loss)


def make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds from ``on_step_begin`` to ``on_step_end``: one whole optimizer step."""

        def on_train_begin(self, args, state, control, **kwargs):
            _train_begin()

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            opt = _unwrap(optimizer)
            self.hessian = bool(opt.is_hessian_step()) if hasattr(opt, "is_hessian_step") else False
            self.cpu = time.process_time()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            t = time.perf_counter() - self.t
            _record_step(t, time.process_time() - self.cpu, self.hessian)

        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            _train_end(optimizer)

    return StepTimer()


def build_peer(spec: dict, params, lr: float):
    module, _, name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(params, lr=lr, **spec.get("kwargs", {}))


def instrument(base, loop_spec: dict | None):
    from transformers.trainer_utils import TrainOutput

    class Instrumented(base):
        def __init__(self, *args, **kwargs):
            RECORD["rss_at_trainer_init_mb"] = rss_mb()  # model loaded, data tokenized
            RECORD["peak_rss_at_trainer_init_mb"] = peak_rss_mb()
            super().__init__(*args, **kwargs)
            RECORD["output_dir"] = self.args.output_dir
            if loop_spec is None:
                self.add_callback(make_timer_callback())

        def training_step(self, model, inputs, num_items_in_batch=None):
            if len(RECORD["fingerprints"]) < FINGERPRINT_STEPS:
                RECORD["fingerprints"].append(fingerprint(inputs))
            loss = super().training_step(model, inputs, num_items_in_batch)
            RECORD["losses"].append(float(loss))
            return loss

        def evaluate(self, *args, **kwargs):
            metrics = super().evaluate(*args, **kwargs)
            RECORD["eval_metrics"] = dict(metrics)
            return metrics

        def train(self, *args, **kwargs):
            if loop_spec is None:
                return super().train(*args, **kwargs)
            return self._plain_loop(loop_spec)

        def _plain_loop(self, spec: dict):
            """A plain PyTorch loop on the Trainer's own batches, schedule and clipping."""
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from transformers import get_scheduler

            args, model = self.args, self.model
            max_steps = args.max_steps
            interval = spec["hessian_interval"]
            dataloader = self.get_train_dataloader()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_peer(spec, params, args.learning_rate)
            scheduler = get_scheduler(
                args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
                num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
            model.zero_grad(set_to_none=True)
            _train_begin()
            step, epoch = 0, 0
            while step < max_steps:
                # As the Trainer does at each epoch (it reaches the batch sampler too).
                for obj in (dataloader, getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)):
                    if hasattr(obj, "set_epoch"):
                        obj.set_epoch(epoch)
                for inputs in dataloader:
                    hessian = step % interval == 0
                    if len(RECORD["fingerprints"]) < FINGERPRINT_STEPS:
                        RECORD["fingerprints"].append(fingerprint(inputs))
                    cpu0 = time.process_time()
                    t0 = time.perf_counter()
                    model.train()
                    inputs = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                    # SDPA's fused CPU kernels have no double backward: the math kernel on Hessian
                    # steps, exactly as AdaHessianTrainer does.
                    with sdpa_kernel([SDPBackend.MATH]) if hessian else contextlib.nullcontext():
                        loss = model(**inputs).loss
                        t1 = time.perf_counter()
                        loss.backward(create_graph=hessian)
                    t2 = time.perf_counter()
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    t3 = time.perf_counter()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)  # also frees the double-backward graph
                    t4 = time.perf_counter()
                    cpu = time.process_time() - cpu0
                    RECORD["phases"].append({"forward": t1 - t0, "backward": t2 - t1, "clip_step": t3 - t2,
                                             "sched_zero": t4 - t3})
                    _record_step(t4 - t0, cpu, hessian, float(loss.detach()))
                    step += 1
                    if step >= max_steps:
                        break
                epoch += 1
            _train_end()
            self.state.global_step = step
            mean_loss = sum(RECORD["losses"]) / max(1, len(RECORD["losses"]))
            return TrainOutput(step, mean_loss, {"train_loss": mean_loss})

    Instrumented.__name__ = Instrumented.__qualname__ = f"Instrumented{base.__name__}"
    return Instrumented


def record_model_load() -> None:
    """RSS right after the script's ``AutoModelFor*.from_pretrained`` returns."""
    import transformers

    for name in ("AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM"):
        auto = getattr(transformers, name)
        original = auto.from_pretrained.__func__

        def from_pretrained(cls, *args, _original=original, **kwargs):
            model = _original(cls, *args, **kwargs)
            RECORD["rss_after_model_load_mb"] = rss_mb()
            return model

        auto.from_pretrained = classmethod(from_pretrained)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    parser.add_argument("--loop", help="JSON: {'class': 'pkg.Optimizer', 'kwargs': {...}, 'hessian_interval': N}")
    parser.add_argument("--keep_model", action="store_true", help="keep the weights the script saves")
    opts = parser.parse_args(argv[:split])
    script_argv = argv[split + 1:]
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    RECORD.update(argv=script_argv, loop=json.loads(opts.loop) if opts.loop else None,
                  torch_threads=torch.get_num_threads(), rss_start_mb=rss_mb())

    import hf_adahessian

    record_model_load()
    loop_spec = RECORD["loop"]
    for name in ("AdaHessianTrainer", "AdaHessianSeq2SeqTrainer"):
        # The scripts do `from hf_adahessian import AdaHessianTrainer`: the package attribute is what they get.
        setattr(hf_adahessian, name, instrument(getattr(hf_adahessian, name), loop_spec))

    rc = 0
    try:
        sys.argv = script_argv
        runpy.run_path(script_argv[0], run_name="__main__")
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        RECORD["peak_rss_final_mb"] = peak_rss_mb()
        RECORD.pop("_t0", None)
        out = RECORD.get("output_dir")
        if out and not opts.keep_model:
            for f in Path(out).glob("*.safetensors"):
                f.unlink()
        Path(opts.result).write_text(json.dumps(RECORD, default=str))
    sys.exit(rc)


if __name__ == "__main__":
    main()
