"""The benchmarks' plain loop takes a step the way the Trainer does."""

import pytest
import torch

from benchmarks.steps import finish_step, no_phase


class _Optimizer:
    """Records what the loop tells it, and the gradient ``step()`` sees."""

    def __init__(self, param, clip_hessian):
        self.param, self.clip_hessian, self.factors = param, clip_hessian, []

    def gradient_clipped_by_norm(self, norm, max_norm):
        # torch's clip factor for that norm, as AdaHessian makes it (tested in test_optimizer.py)
        self.factors.append(min(1.0, max_norm / (float(norm) + 1e-6)))

    def step(self):
        self.grad_at_step = self.param.grad.clone()

    def zero_grad(self, set_to_none=True):
        self.param.grad = None


def test_a_clipped_step_tells_clip_hessian_torchs_clip_factor():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)  # norm 4
    optimizer = _Optimizer(param, clip_hessian=True)
    finish_step(optimizer, [param], no_phase, max_grad_norm=1.0)
    assert optimizer.factors == [pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-12)]
    torch.testing.assert_close(optimizer.grad_at_step, torch.full((4,), 2.0 / (4.0 + 1e-6)))
    assert param.grad is None


def test_an_unclipped_step_says_factor_one_and_an_optimizer_without_clip_hessian_is_told_nothing():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 0.25)  # norm 0.5, under the bound
    told = _Optimizer(param, clip_hessian=True)
    finish_step(told, [param], no_phase, max_grad_norm=1.0)
    assert told.factors == [1.0]
    param.grad = torch.full((4,), 2.0)
    untold = _Optimizer(param, clip_hessian=False)
    finish_step(untold, [param], no_phase, max_grad_norm=1.0)
    assert untold.factors == []
