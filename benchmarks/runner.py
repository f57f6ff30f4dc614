"""The instrumented child: one run of an unmodified example script, in this process.

    python -m benchmarks.runner --result R.json [--loop SPEC_JSON] -- run_glue.py ARGS...

**The seam.** A script builds its Trainer from the name it imports (``from hf_adahessian
import AdaHessianTrainer``) and its model through ``AutoModelFor*.from_pretrained``. The
runner loads the script as a module of its own (not ``__main__``, so its ``if __name__ ==
"__main__"`` guard does not fire), rebinds those names in *the script's namespace only* and
then calls the script's ``main`` as its guard does (``run_script(main)``):

* the trainer classes become subclasses (:func:`instrumented`) that write to this run's
  :class:`~benchmarks.recorder.Recorder`;
* the auto-model classes become a proxy (:class:`RecordingAutoModel`) that notes the RSS
  right after the model is loaded.

This is how ``hf_adahessian/launch.py`` substitutes classes (by name, before the script
runs), narrowed from a package's attributes to the one script module: nothing on
``hf_adahessian`` or ``transformers`` is patched, so any other importer of those names
gets the stock classes, and no state lives at module level: the Recorder is made in
:func:`main` and handed to the subclass, its callback and the plain loop.

What is measured (see ``recorder.py``): every optimizer step, timed by a
``TrainerCallback`` from ``on_step_begin`` to ``on_step_end`` (forward, backward or Hessian
step, clipping, ``optimizer.step()``, scheduler, zero_grad), or by the plain loop around
the same phases; RSS; every evaluation, with the step and the training clock. With
``--loop`` the Trainer's ``train()`` is replaced by ``plain_loop.plain_loop`` for an
optimizer that is not a Trainer optimizer. Evaluation stays the script's own. The record
is written as JSON even if the run fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch
from transformers import TrainerCallback

from .plain_loop import plain_loop
from .recorder import Recorder
from .specs import OptimizerSpec

TRAINER_NAMES = ("AdaHessianTrainer", "AdaHessianSeq2SeqTrainer")
AUTO_MODEL_NAMES = ("AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM")


def unwrap(optimizer):
    """The optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class StepTimer(TrainerCallback):
    """``on_step_begin`` -> ``on_step_end``: one whole optimizer step, into the Recorder."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.hessian = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.recorder.train_begin()

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        self.hessian = bool(opt.is_hessian_step()) if hasattr(opt, "is_hessian_step") else False
        self.recorder.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.step_end(self.hessian)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.recorder.train_end(getattr(unwrap(optimizer), "counters", None))


def instrumented(base: type, recorder: Recorder, loop: OptimizerSpec | None) -> type:
    """A subclass of the script's Trainer that records into ``recorder`` (and, with ``loop``, trains in the plain loop)."""

    class Instrumented(base):
        def __init__(self, *args, **kwargs):
            recorder.trainer_built()  # model loaded, data tokenized
            super().__init__(*args, **kwargs)
            recorder.output_dir = self.args.output_dir
            if loop is None:
                self.add_callback(StepTimer(recorder))

        def training_step(self, model, inputs, num_items_in_batch=None):
            recorder.batch(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            recorder.losses.append(float(loss))
            return loss

        def evaluate(self, *args, **kwargs):
            recorder.eval_begin()
            metrics = super().evaluate(*args, **kwargs)
            recorder.eval_end(self.state.global_step, metrics)
            return metrics

        def train(self, *args, **kwargs):
            if loop is None:
                return super().train(*args, **kwargs)
            return plain_loop(self, loop, recorder)

    Instrumented.__name__ = Instrumented.__qualname__ = f"Instrumented{base.__name__}"
    return Instrumented


class RecordingAutoModel:
    """An ``AutoModelFor*`` class whose ``from_pretrained`` notes the RSS right after the model is loaded."""

    def __init__(self, auto, recorder: Recorder):
        self._auto, self._recorder = auto, recorder

    def from_pretrained(self, *args, **kwargs):
        model = self._auto.from_pretrained(*args, **kwargs)
        self._recorder.model_loaded()
        return model

    def __getattr__(self, name):
        return getattr(self._auto, name)


def load_script(path: str) -> ModuleType:
    """The script as a module named ``benchmark_script``: its top level runs, its ``__main__`` guard does not."""
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    module = importlib.util.module_from_spec(spec)
    # Registered, so that its dataclasses' annotations resolve (HfArgumentParser reads them).
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def substitute(module: ModuleType, recorder: Recorder, loop: OptimizerSpec | None) -> None:
    """Rebind the script's trainer and auto-model names to the recording ones (see the module docstring)."""
    found = [n for n in TRAINER_NAMES if hasattr(module, n)]
    if not found:
        raise SystemExit(f"error: {module.__file__} imports none of {', '.join(TRAINER_NAMES)}")
    for name in found:
        setattr(module, name, instrumented(getattr(module, name), recorder, loop))
    for name in AUTO_MODEL_NAMES:
        if hasattr(module, name):
            setattr(module, name, RecordingAutoModel(getattr(module, name), recorder))


def run(script_argv: list[str], recorder: Recorder, loop: OptimizerSpec | None) -> int:
    """The script's ``main`` as its ``__main__`` guard runs it; the exit status."""
    try:
        sys.argv = list(script_argv)
        module = load_script(script_argv[0])
        substitute(module, recorder, loop)
        module.run_script(module.main)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runner")
    parser.add_argument("--result", required=True)
    parser.add_argument("--loop", help="the OptimizerSpec (JSON) of an optimizer to train in the plain loop")
    parser.add_argument("--keep_model", action="store_true", help="keep the weights the script saves")
    opts = parser.parse_args(argv[:split])
    script_argv = argv[split + 1:]
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    loop = OptimizerSpec.from_json(json.loads(opts.loop)) if opts.loop else None
    recorder = Recorder()
    rc = run(script_argv, recorder, loop)
    recorder.finish()
    if recorder.output_dir and not opts.keep_model:
        for f in Path(recorder.output_dir).glob("*.safetensors"):
            f.unlink()
    record = {"argv": script_argv, "loop": loop.to_json() if loop else None, "torch_threads": torch.get_num_threads(),
              **recorder.to_json()}
    Path(opts.result).write_text(json.dumps(record, default=str))
    sys.exit(rc)


if __name__ == "__main__":
    main()
