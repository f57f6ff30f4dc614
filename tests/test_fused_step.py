"""Steps without a fresh estimate through torch's fused AdamW kernel (``fused_step.py``).

The kernel is told to hold v (β2 = 1 − 2⁻⁵³) and its lr, eps and weight decay are rescaled:
its step must be the for-loop's to fp32 rounding, v must come back bit for bit wherever it is
not negligible against the gradient, and every tensor it cannot take keeps the loop's step.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import hf_adahessian.fused_step as fused_step
import hf_adahessian.optimizer as optimizer_module
from hf_adahessian import AdaHessian
from hf_adahessian.fused_step import HOLDING_BETA2, fused_kernel_holds_v
from tests.optim_helpers import assert_all_equal, clone_params, mse, regression_batch, tiny_mlp


def _train(model, opt, steps):
    for step in range(steps):
        opt.zero_grad()
        x, y = regression_batch(step, dtype=next(model.parameters()).dtype)
        mse(model, x, y).backward(create_graph=opt.is_hessian_step())
        opt.step()


@contextlib.contextmanager
def _counted_calls():
    """The kernel calls made inside, each as the shapes of the tensors it took."""
    calls, original = [], fused_step._fused_call

    def counting(*args, **kwargs):
        calls.append([tuple(p.shape) for p in args[0]])
        return original(*args, **kwargs)

    fused_step._fused_call = counting
    try:
        yield calls
    finally:
        fused_step._fused_call = original


def _runs(steps=7, **settings):
    """(params, optimizer, kernel calls) for fused=False and fused=None, same model, same batches."""
    out = []
    dtype = settings.pop("dtype", torch.float32)
    for fused in (False, None):
        model = tiny_mlp(0, dtype)
        opt = AdaHessian(model.parameters(), fused=fused, **settings)
        with _counted_calls() as calls:
            _train(model, opt, steps)
        out.append((clone_params(model), opt, calls))
    return out


def test_this_torch_s_kernel_holds_v_and_takes_the_loops_step():
    """The check the optimizer makes once a process passes on the torch CI installs: the path is live."""
    assert fused_kernel_holds_v()
    assert float(torch.tensor(HOLDING_BETA2, dtype=torch.float32)) == 1.0 and HOLDING_BETA2 < 1.0


SETTINGS = [
    dict(lr=0.05, weight_decay=0.01, hessian_interval=3),
    dict(lr=0.05, weight_decay=0.0, hessian_interval=2, block_size=2),
    dict(lr=0.05, weight_decay=0.1, hessian_interval=4, stale_guard=True),
    dict(lr=0.05, weight_decay=0.1, hessian_interval=4, stale_guard=True, stale_guard_reference="average"),
]
SETTINGS_IDS = ["decay", "blocks", "stale_guard", "stale_guard_average"]


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTINGS_IDS)
def test_one_step_through_the_kernel_holds_v_and_takes_the_loops_step(settings):
    """From one state, a step without an estimate both ways: v bit for bit, m and θ to fp32 rounding."""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), seed=0, fused=False, **settings)
    _train(model, opt, settings["hessian_interval"] + 1)  # a Hessian step, a plain step
    assert not opt.is_hessian_step()
    x, y = regression_batch(99)
    results = []
    for fused in (False, None):
        twin = copy.deepcopy(model)
        twin_opt = AdaHessian(twin.parameters(), seed=0, fused=fused, **settings)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for group in twin_opt.param_groups:
            group["fused"] = fused  # the checkpoint's groups carry the setting they were saved with
        twin_opt.zero_grad()
        mse(twin, x, y).backward()
        with _counted_calls() as calls:
            twin_opt.step()
        results.append((clone_params(twin), list(twin_opt.state.values()), calls))
    (p_loop, s_loop, calls_loop), (p_fused, s_fused, calls_fused) = results
    # Every tensor takes the kernel: those whose rows an estimate saw as exactly zero (a ReLU's dead units),
    # counted apart, a slice of rows at a time, in calls of their own.
    assert calls_loop == [] and sum(map(len, calls_fused)) == len(s_fused)
    assert_all_equal([s["exp_hessian_diag_sq"] for s in s_fused], [s["exp_hessian_diag_sq"] for s in s_loop], "v")
    for a, b in zip(p_fused, p_loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for a, b in zip(s_fused, s_loop):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTINGS_IDS)
def test_a_run_through_the_kernel_is_the_loops_run_to_float32_rounding(settings):
    """Every step without an estimate through the kernel, every Hessian step through the loop, over
    several intervals: the run stays the loop's to fp32 rounding (the estimates are taken at parameters
    that differ by that much, so v does too)."""
    (p_loop, opt_loop, calls_loop), (p_fused, opt_fused, calls_fused) = _runs(steps=9, seed=0, **settings)
    plain_steps = 9 - len(range(0, 9, settings["hessian_interval"]))
    assert calls_loop == []
    assert len(calls_fused) >= plain_steps, "every step without an estimate went through the kernel"
    for a, b in zip(p_fused, p_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for fused_state, loop_state in zip(opt_fused.state.values(), opt_loop.state.values()):
        for key in ("exp_avg", "exp_hessian_diag_sq"):
            torch.testing.assert_close(fused_state[key], loop_state[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("settings", [
    dict(dtype=torch.bfloat16), dict(hessian_power=0.5), dict(update_clip=0.5), dict(hessian_interval=1),
], ids=["bf16", "power_half", "update_clip", "interval_1"])
def test_steps_the_kernel_cannot_take_are_the_loops_bit_for_bit(settings):
    """bf16 parameters, a power other than 1, a bounded update: the loop's step; at interval 1 every step
    has an estimate and the kernel is never called (the paper's rule, exactly)."""
    settings = {"lr": 0.05, "weight_decay": 0.01, "hessian_interval": 2, "seed": 0, **settings}
    (p_loop, opt_loop, _), (p_fused, opt_fused, calls) = _runs(steps=6, **settings)
    assert calls == []
    assert_all_equal(p_fused, p_loop, "parameter")


def _bag_run(fused, steps=9, **settings):
    """An embedding of 10 rows whose batches use rows 0-3 only (the rest never seen, so rows are counted
    apart and the floor is live) into a linear layer: (parameters, state, kernel calls, optimizer, and for each
    step between estimates whether it left the embedding's v as it was, bit for bit)."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)
    opt = AdaHessian([*emb.parameters(), *lin.parameters()], lr=0.05, seed=0, fused=fused,
                     **{"hessian_interval": 2, **settings})
    held = []
    with _counted_calls() as calls:
        for step in range(steps):
            opt.zero_grad()
            ids = torch.tensor([[step % 3, 1 + step % 3]])
            loss = lin(emb(ids)).pow(2).mean()
            hessian_step = opt.is_hessian_step()
            loss.backward(create_graph=hessian_step)
            v = opt.state[emb.weight].get("exp_hessian_diag_sq")
            before = None if v is None else v.clone()
            opt.step()
            if not hessian_step and before is not None:
                held.append(torch.equal(v, before))
    state = [opt.state[p][k].clone() for p in (emb.weight, lin.weight) for k in ("exp_avg", "exp_hessian_diag_sq")]
    return [emb.weight.detach().clone(), lin.weight.detach().clone()], state, calls, opt, held


ROW_SETTINGS = [dict(), dict(weight_decay=0.1, min_row_estimates=2),
                dict(hessian_interval=3, stale_guard=True, stale_guard_reference="average"),
                dict(hessian_interval=3, hessian_warmup=2, stale_guard=True, time_weighted=True)]


@pytest.mark.parametrize("slice_elements", [None, 8], ids=["whole", "two rows a slice"])
@pytest.mark.parametrize("settings", ROW_SETTINGS, ids=["paper", "decay, row floor", "row-wise guard", "weighted"])
def test_rows_counted_apart_take_the_kernel_a_slice_at_a_time_and_the_loops_step(monkeypatch, settings,
                                                                                   slice_elements):
    """An embedding whose rows an estimate saw unevenly has a denominator per row (each row's bias correction,
    the floor for rows never seen, the stale guard's factor per row): between estimates the kernel takes it
    with that denominator squared in place of v, a slice of rows at a time, and the run is the loop's to fp32
    rounding (v too: its estimates are taken at parameters that differ by that much). The kernel reads a copy:
    a step between estimates leaves v as it was, bit for bit."""
    if slice_elements is not None:
        monkeypatch.setattr(optimizer_module, "DENOMINATOR_SLICE", slice_elements)
    p_loop, s_loop, calls_loop, _, _ = _bag_run(False, **settings)
    p_fused, s_fused, calls, opt, held = _bag_run(None, **settings)
    emb = opt.param_groups[0]["params"][0]
    assert "row_hessian_steps" in opt.state[emb] and calls_loop == []
    slices = 1 if slice_elements is None else 5
    assert sum(shapes.count((10, 4) if slices == 1 else (2, 4)) for shapes in calls) >= slices * 3
    for a, b in zip(p_fused, p_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_fused[0], s_loop[0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s_fused[1], s_loop[1], rtol=1e-5, atol=0)
    assert len(held) >= 3 and all(held)


def test_a_coordinate_without_curvature_creeps_by_at_most_the_kernels_term():
    """v = 0 where the loss is linear: the kernel may add 2⁻⁵³·g² a step there (the one place v is not held),
    a denominator change far under eps, so the step is the loop's to fp32 rounding."""
    linear = torch.arange(40) % 2 == 0

    def run(fused):
        p = torch.linspace(-1.0, 1.0, 40).requires_grad_(True)
        opt = AdaHessian([p], lr=0.05, hessian_interval=3, seed=0, fused=fused)
        grads = []
        for step in range(7):
            opt.zero_grad()
            loss = 0.3 * p[linear].sum() + (p[~linear] ** 2).sum()
            loss.backward(create_graph=opt.is_hessian_step())
            grads.append(p.grad.detach().clone())
            opt.step()
        return p.detach().clone(), opt.state[p]["exp_hessian_diag_sq"].clone(), torch.stack(grads)

    p_loop, v_loop, _ = run(False)
    p_fused, v_fused, grads = run(None)
    assert torch.equal(v_loop[linear], torch.zeros(20))
    assert (v_fused[linear] <= 7 * 2.0**-53 * grads[:, linear].pow(2).amax(0)).all()
    torch.testing.assert_close(v_fused[~linear], v_loop[~linear], rtol=1e-5, atol=0)
    torch.testing.assert_close(p_fused, p_loop, rtol=1e-6, atol=0)


def test_fused_true_where_the_kernel_fails_its_check_is_an_error_at_construction(monkeypatch):
    monkeypatch.setattr(optimizer_module, "fused_kernel_holds_v", lambda: False)
    with pytest.raises(ValueError, match="fused=True.*fused=None or fused=False"):
        AdaHessian(tiny_mlp(0).parameters(), fused=True)
    # None falls back to the loop without a word: the kernel is an implementation, not a setting.
    (p_loop, _, _), (p_none, _, calls) = _runs(steps=5, lr=0.05, hessian_interval=2, seed=0)
    assert calls == []
    assert_all_equal(p_none, p_loop, "parameter")
