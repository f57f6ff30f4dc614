"""Clipping keeps each gradient's norm, and the step reads them instead of measuring them again.

``clip_grad_norm_measured_`` is torch's ``clip_grad_norm_`` with its parts kept; a step told them
is the step that measures the clipped gradients itself (to rounding: n·factor against ‖factor·g‖),
makes no norm of its own, and measures again wherever a gradient is no longer the one measured.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_adahessian import AdaHessian
from hf_adahessian.clipping import clip_grad_norm_measured_
from optim_helpers import assert_all_equal, clone_params, mse, regression_batch, tiny_mlp

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")

GUARDED = {"hessian_interval": 3, "stale_guard": True, "clip_hessian": True}


def _gradients(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in ((5, 3), (3,), (), (7, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype) * 3
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e3, float("inf")], ids=["clipping", "under the bound", "inf"])
def test_the_measured_clip_is_torchs_clip_grad_norm_bit_for_bit(dtype, max_norm):
    ours, torchs = _gradients(dtype), _gradients(dtype)
    total, (params, norms) = clip_grad_norm_measured_(ours, max_norm)
    expected_norms = [torch.linalg.vector_norm(p.grad) for p in torchs]
    expected_total = torch.nn.utils.clip_grad_norm_(torchs, max_norm)

    assert params == ours
    assert_all_equal([total], [expected_total], "total norm")
    assert_all_equal(norms, expected_norms, "norm before clipping")
    assert_all_equal([p.grad for p in ours], [p.grad for p in torchs], "clipped gradient")


def test_gradients_of_two_dtypes_are_clipped_as_torch_clips_them_to_the_order_of_the_sum():
    ours, torchs = _gradients(torch.float32)[:2] + _gradients(torch.float64)[2:], \
        _gradients(torch.float32)[:2] + _gradients(torch.float64)[2:]
    total, _ = clip_grad_norm_measured_(ours, 0.5)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(torchs, 0.5))
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a.grad, b.grad)


def test_parameters_without_a_gradient_are_left_out():
    params = _gradients(torch.float32)
    params[1].grad = None
    _, (measured, norms) = clip_grad_norm_measured_(params, 1.0)
    assert measured == [params[0], params[2], params[3]] and len(norms) == 3


def _run(told: bool, settings: dict, steps: int = 7, replace_grad: bool = False):
    """A standalone loop clipping to 0.01 on odd steps (a factor far below 1) and 1e3 on even ones."""
    model = tiny_mlp(0, torch.float64)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0, **settings)
    for step in range(steps):
        opt.zero_grad()
        x, y = regression_batch(step, dtype=torch.float64)
        mse(model, x, y).backward(create_graph=opt.is_hessian_step())
        max_norm = 0.01 if step % 2 else 1e3
        if told:
            norm, measured = clip_grad_norm_measured_(list(model.parameters()), max_norm)
            opt.gradient_clipped_by_norm(norm, max_norm, measured)
        else:
            opt.gradient_clipped_by_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), max_norm)
        if replace_grad:
            for p in model.parameters():
                p.grad = p.grad * 0.5  # a new tensor (with the graph, where there is one)
        opt.step()
    return model, opt


def _guard_state(opt: AdaHessian) -> list[float]:
    return [state[key] for state in opt.state.values() for key in sorted(state)
            if key.startswith("grad_")]


@pytest.mark.parametrize("reference", ["last", "average"])
def test_a_step_told_the_measured_norms_is_the_step_that_measures_them(reference):
    """The stale guard's norms are the clipped gradients' (a told norm times the clip factor, not the norm
    before clipping: odd steps clip by about 0.01, which the guard's averages would show 100-fold).  The
    step reads norms in float32 either way, so they agree to its rounding."""
    settings = {**GUARDED, "stale_guard_reference": reference}
    (told_model, told), (own_model, own) = _run(True, settings), _run(False, settings)
    guard_told, guard_own = _guard_state(told), _guard_state(own)
    assert guard_told and guard_told == pytest.approx(guard_own, rel=1e-6)
    for a, b in zip(clone_params(told_model), clone_params(own_model)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert told.stats.counters() == own.stats.counters()


def test_without_the_stale_guard_a_told_step_is_the_same_bit_for_bit():
    """Only the finiteness check reads the norms then: the step is the same."""
    settings = {"hessian_interval": 3, "clip_hessian": True}
    (told_model, _), (own_model, _) = _run(True, settings), _run(False, settings)
    assert_all_equal(clone_params(told_model), clone_params(own_model), "parameter")


class _Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


NORMS = {"linalg_vector_norm", "_foreach_norm", "norm"}


@pytest.mark.parametrize("told", [True, False], ids=["told", "not told"])
def test_a_told_step_makes_no_norm_of_the_gradients(told):
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0, **GUARDED)
    for step in range(2):  # a Hessian step, then one without
        opt.zero_grad()
        x, y = regression_batch(step)
        mse(model, x, y).backward(create_graph=opt.is_hessian_step())
        norm, measured = clip_grad_norm_measured_(list(model.parameters()), 0.01)
        opt.gradient_clipped_by_norm(norm, 0.01, measured if told else None)
        with _Operators() as ran:
            opt.step()
        assert bool(ran.names & NORMS) is not told, sorted(ran.names)


def test_a_gradient_replaced_after_measuring_is_measured_again():
    """The norms told are the measured tensors': a gradient that is another tensor by the step (here
    halved into a new one) takes its own norm, and the step is the one never told."""
    (told_model, told), (own_model, own) = (_run(True, GUARDED, replace_grad=True),
                                            _run(False, GUARDED, replace_grad=True))
    assert_all_equal(clone_params(told_model), clone_params(own_model), "parameter")
    assert _guard_state(told) == _guard_state(own)


def test_measured_norms_are_read_by_the_next_step_only():
    """A second step on the same gradient tensors (no zero_grad, no clipping between) measures them itself:
    the norms told were the first step's.  (Steps without an estimate: a Hessian step detaches the
    gradients, which would make them other tensors anyway.)"""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0, **GUARDED)
    x, y = regression_batch(0)
    mse(model, x, y).backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    mse(model, x, y).backward()
    norm, measured = clip_grad_norm_measured_(list(model.parameters()), 0.01)
    opt.gradient_clipped_by_norm(norm, 0.01, measured)
    for step in range(2):
        assert not opt.is_hessian_step()
        with _Operators() as ran:
            opt.step()
        assert bool(ran.names & NORMS) is (step == 1)


def test_told_norms_keep_no_gradient_alive():
    """A step the loss scaler skips never reads them: the gradients they were measured on must still be freed by
    ``zero_grad``, not held through the next backward."""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0, **GUARDED)
    x, y = regression_batch(0)
    mse(model, x, y).backward()
    norm, measured = clip_grad_norm_measured_(list(model.parameters()), 0.01)
    opt.gradient_clipped_by_norm(norm, 0.01, measured)
    gradients = [weakref.ref(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    assert all(g() is None for g in gradients)
