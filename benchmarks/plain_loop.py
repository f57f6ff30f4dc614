"""The plain PyTorch loop for optimizers that are not Trainer optimizers (the peers, and a control).

It replaces ``Trainer.train()`` in the child (``runner.py``) and uses the Trainer's own
pieces wherever the Trainer would: its train dataloader (same tokenization, same order,
its per-epoch ``set_epoch``), ``get_scheduler`` with its schedule and warm-up, clipping at
``max_grad_norm``, and its ``evaluate()`` every ``eval_steps`` with ``--eval_strategy steps``.
A step is ``steps.backward_step``: on the steps on which the optimizer estimates a Hessian
(:func:`hessian_step`) ``backward(create_graph=True)`` under ``hessian_pass.double_backward_ready``,
as the Trainer's Hessian step runs its forward; then ``step()`` and ``zero_grad``.
"""

from __future__ import annotations

import math

import torch

from .recorder import Recorder
from .specs import OptimizerSpec, build_loop_optimizer
from .steps import PhaseTimer, backward_step


def eval_interval(args) -> int | None:
    """Evaluate every this many steps (``--eval_strategy steps --eval_steps K``), or None."""
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "steps" or not args.eval_steps:
        return None
    steps = args.eval_steps
    return int(steps) if steps >= 1 else max(1, math.ceil(steps * args.max_steps))


def hessian_step(optimizer, step: int, interval: int | None) -> bool:
    """Whether this step needs ``backward(create_graph=True)``: the optimizer's own word when it has one
    (this package's AdaHessian, whose schedule has a warm-up), else steps 0, N, 2N, …"""
    if hasattr(optimizer, "is_hessian_step"):
        return bool(optimizer.is_hessian_step())
    return bool(interval) and step % interval == 0


def set_epoch(dataloader, epoch: int) -> None:
    """As the Trainer does at each epoch (it reaches the batch sampler too)."""
    for obj in (dataloader, getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def plain_loop(trainer, spec: OptimizerSpec, recorder: Recorder):
    """Train ``trainer.model`` for ``max_steps`` with ``spec``'s optimizer; returns a ``TrainOutput``."""
    from transformers import get_scheduler
    from transformers.trainer_utils import TrainOutput

    args, model = trainer.args, trainer.model
    max_steps, interval = args.max_steps, spec.hessian_interval
    every = eval_interval(args)
    dataloader = trainer.get_train_dataloader()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_loop_optimizer(spec, params, args.learning_rate, args.seed)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    model.zero_grad(set_to_none=True)
    recorder.train_begin()
    step, epoch = 0, 0
    while step < max_steps:
        set_epoch(dataloader, epoch)
        for inputs in dataloader:
            hessian = hessian_step(optimizer, step, interval)
            recorder.batch(inputs)
            recorder.step_begin()
            timer = PhaseTimer()
            model.train()
            inputs = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            loss = backward_step(model, inputs, optimizer, params, timer, create_graph=hessian,
                                 max_grad_norm=args.max_grad_norm)
            with timer("scheduler"):
                scheduler.step()
            recorder.step_end(hessian, float(loss), timer.seconds)
            step += 1
            trainer.state.global_step = step
            if every and step % every == 0:
                trainer.evaluate()
            if step >= max_steps:
                break
        epoch += 1
    recorder.train_end(getattr(optimizer, "counters", None))
    mean_loss = sum(recorder.losses) / max(1, len(recorder.losses))
    return TrainOutput(step, mean_loss, {"train_loss": mean_loss})
