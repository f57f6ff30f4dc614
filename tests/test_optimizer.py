"""Specification of ``hf_adahessian.AdaHessian``.

The update rule under test is the one in the optimizer's module docstring:

    m_t = β1 m_{t-1} + (1 − β1) g_t
    v_s = β2 v_{s-1} + (1 − β2) D_s²              on Hessian steps only (s counts them)
    p  ← p (1 − lr·wd)                            decoupled weight decay
    p  ← p − lr · m̂_t / ((√v̂_s)^k + eps)          m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^s)

with D = |z ⊙ Hz| averaged over blocks.  ``ReferenceAdaHessian`` below re-implements
it element by element in float64 Python arithmetic, independently of the package.
"""

from __future__ import annotations

import io
import itertools
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_adahessian import AdaHessian
from hf_adahessian.optimizer import stale_factors
from optim_helpers import assert_all_equal, clone_params, copy_model, mse, regression_batch, tiny_mlp

# ``loss.backward(create_graph=True)`` is the documented standalone API; torch warns about
# the grad <-> graph reference cycle it creates, which AdaHessian.step() breaks.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")


def _backward_for(opt: AdaHessian, loss: torch.Tensor) -> None:
    """What a standalone training loop does: a double-backward graph only when it is needed."""
    loss.backward(create_graph=opt.is_hessian_step())


def _train(model, opt, steps, first_step=0, path="standalone"):
    for step in range(first_step, first_step + steps):
        opt.zero_grad()
        x, y = regression_batch(step, dtype=next(model.parameters()).dtype)
        loss = mse(model, x, y)
        if path == "standalone":
            _backward_for(opt, loss)
        elif opt.is_hessian_step():
            opt.estimate().accumulate(loss)
        else:
            loss.backward()
        opt.step()


# =====================================================================================
# The update rule against a hand-written reference
# =====================================================================================
#
# The model is separable, f(p) = Σ_i a_i p_i²/2 + b_i p_i⁴/12 + c_i p_i, so its Hessian is
# diagonal with H_ii = a_i + b_i p_i².  Then Hz = H ⊙ z and z ⊙ Hz = diag(H) for every ±1
# probe: the optimizer's D is known in closed form and the reference needs no autograd.
# Some entries have a_i < 0, b_i = 0 (negative curvature) next to positive ones in the
# same block, so that |·| must be taken before block averaging, as the docstring says.


def _coefficients(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    a = torch.rand(n, generator=gen, dtype=torch.float64) * 2.5 + 0.5
    b = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    c = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
    negative = torch.arange(n) % 4 == 1
    a[negative] = -0.7
    b[negative] = 0.0
    p0 = torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1.5
    return [t.reshape(shape).float() for t in (a, b, c, p0)]


def _separable_loss(params, coeffs):
    return sum((a * p * p / 2 + b * p**4 / 12 + c * p).sum() for p, (a, b, c, _) in zip(params, coeffs))


def _flat_index(shape, idx):
    flat = 0
    for size, i in zip(shape, idx):
        flat = flat * size + i
    return flat


def _averaging_groups(shape, block_size, average_conv_kernel):
    """Stages of index groups whose |D| share a mean, from the rules in ``block_average``'s docstring.

    Stage 1: a 4-D conv kernel, each (out, in) filter over its spatial taps.
    Stage 2: any tensor with two or more dims, blocks of ``block_size`` along the last
    dim, the last block shorter.
    """
    stages = []
    if len(shape) == 4 and average_conv_kernel:
        o, i, kh, kw = shape
        stages.append([[_flat_index(shape, (a, b, h, w)) for h in range(kh) for w in range(kw)]
                       for a in range(o) for b in range(i)])
    if len(shape) >= 2 and block_size > 1:
        *lead, n = shape
        stages.append([[_flat_index(shape, (*prefix, j)) for j in range(start, min(start + block_size, n))]
                       for prefix in itertools.product(*(range(s) for s in lead))
                       for start in range(0, n, block_size)])
    return stages


class ReferenceAdaHessian:
    """AdaHessian from the formula, one Python float at a time, on the separable model."""

    def __init__(self, groups, hessian_interval):
        # groups: [(hyper, [(shape, (a, b, c, p0)), ...]), ...]
        self.hessian_interval = hessian_interval
        self.t = 0  # steps taken
        self.s = 0  # Hessian updates so far
        self.groups = []
        for hyper, params in groups:
            entries = []
            for shape, (a, b, c, p0) in params:
                entries.append(dict(
                    shape=shape, a=a.flatten().tolist(), b=b.flatten().tolist(), c=c.flatten().tolist(),
                    p=p0.flatten().tolist(), m=[0.0] * p0.numel(), v=[0.0] * p0.numel(),
                    stages=_averaging_groups(shape, hyper["block_size"], hyper["average_conv_kernel"]),
                ))
            self.groups.append((hyper, entries))

    def step(self):
        self.t += 1
        hessian_step = (self.t - 1) % self.hessian_interval == 0
        if hessian_step:
            self.s += 1
        for hyper, entries in self.groups:
            beta1, beta2 = hyper["betas"]
            lr, eps, wd, k = hyper["lr"], hyper["eps"], hyper["weight_decay"], hyper["hessian_power"]
            for e in entries:
                p, a, b, c = e["p"], e["a"], e["b"], e["c"]
                g = [a[i] * p[i] + b[i] * p[i] ** 3 / 3 + c[i] for i in range(len(p))]
                if hessian_step:
                    d = [abs(a[i] + b[i] * p[i] ** 2) for i in range(len(p))]
                    for stage in e["stages"]:
                        averaged = list(d)
                        for group in stage:
                            mean = sum(d[j] for j in group) / len(group)
                            for j in group:
                                averaged[j] = mean
                        d = averaged
                for i in range(len(p)):
                    e["m"][i] = beta1 * e["m"][i] + (1 - beta1) * g[i]
                    if hessian_step:
                        e["v"][i] = beta2 * e["v"][i] + (1 - beta2) * d[i] ** 2
                    p[i] = p[i] * (1 - lr * wd)
                    m_hat = e["m"][i] / (1 - beta1**self.t)
                    v_hat = e["v"][i] / (1 - beta2**self.s)
                    p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) ** k + eps)

    def tensors(self, key):
        return [torch.tensor(e[key], dtype=torch.float64).reshape(e["shape"])
                for _, entries in self.groups for e in entries]


_DEFAULTS = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0,
                 block_size=1, average_conv_kernel=True)

# name: (hessian_interval, [(hyperparameter overrides, [shapes]), ...])
_REFERENCE_CASES = {
    "every_step_power_1": (1, [({}, [(3, 5), (4,), ()])]),
    "interval_3_power_half": (3, [({"hessian_power": 0.5}, [(3, 5), (4,), ()])]),
    "weight_decay_and_large_eps": (1, [({"weight_decay": 0.1, "eps": 0.1, "betas": (0.8, 0.99)}, [(3, 5), (4,)])]),
    "blocks_2d_3d_4d": (2, [({"block_size": 2, "weight_decay": 0.05}, [(3, 5), (2, 3, 5), (2, 2, 3, 3), (4,)])]),
    "blocks_conv_not_averaged": (1, [({"block_size": 2, "average_conv_kernel": False, "hessian_power": 0.5},
                                      [(2, 2, 3, 3), (2, 3, 5)])]),
    # Blocks that tile the last dim: D reaches v as a broadcast of the block means.
    "blocks_tiling_the_last_dim": (2, [({"block_size": 2}, [(3, 4), (2, 3, 6)]),
                                       ({"block_size": 2, "average_conv_kernel": False}, [(2, 2, 3, 4)])]),
    "power_zero_is_momentum_sgd": (1, [({"hessian_power": 0.0, "lr": 0.02}, [(3, 5)])]),
    "two_groups_own_hyperparameters": (2, [
        ({"lr": 0.05, "weight_decay": 0.0}, [(3, 5), (4,)]),
        ({"lr": 0.1, "weight_decay": 0.1, "hessian_power": 0.5, "block_size": 3, "betas": (0.8, 0.99),
          "eps": 0.01}, [(2, 3, 4), (5,)]),
    ]),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
@pytest.mark.parametrize("case", list(_REFERENCE_CASES))
def test_update_rule_matches_the_reference_implementation(case, foreach):
    """Eight steps of the real optimizer track the float64 reference step by step.

    The optimizer runs in float32 against a float64 reference, so they agree to
    float32 rounding, accumulated over the steps (measured below 1e-6; allowed 2e-5).
    Any mistake in the formula (bias corrections, s vs t, where eps goes, abs before
    averaging, weight decay order) moves parameters by ~lr·0.01 or more.
    """
    interval, group_specs = _REFERENCE_CASES[case]
    steps = 8
    shapes = [shape for _, group_shapes in group_specs for shape in group_shapes]
    coeffs = [_coefficients(shape, seed) for seed, shape in enumerate(shapes)]  # (a, b, c, p0) each
    params = [p0.clone().requires_grad_(True) for *_, p0 in coeffs]

    ref_groups, param_groups, start = [], [], 0
    for overrides, group_shapes in group_specs:
        members = range(start, start + len(group_shapes))
        start += len(group_shapes)
        ref_groups.append(({**_DEFAULTS, **overrides},
                           [(shapes[i], [t.double() for t in coeffs[i]]) for i in members]))
        param_groups.append({"params": [params[i] for i in members], **overrides})
    ref = ReferenceAdaHessian(ref_groups, interval)
    opt = AdaHessian(param_groups, **_DEFAULTS, hessian_interval=interval, seed=0, foreach=foreach)

    for step in range(1, steps + 1):
        opt.zero_grad()
        _backward_for(opt, _separable_loss(params, coeffs))
        opt.step()
        ref.step()
        for i, (p, expected) in enumerate(zip(params, ref.tensors("p"))):
            torch.testing.assert_close(p.detach().double(), expected, rtol=2e-5, atol=2e-5,
                                       msg=lambda m: f"step {step}, parameter {i}: {m}")

    for key, ref_key in (("exp_avg", "m"), ("exp_hessian_diag_sq", "v")):
        got = [opt.state[p][key].double() for p in params]
        for i, (g, e) in enumerate(zip(got, ref.tensors(ref_key))):
            torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5, msg=lambda m: f"{key} of parameter {i}: {m}")
    assert opt.counters["step"] == steps
    assert opt.counters["hessian_updates"] == ref.s == len(range(1, steps + 1, interval))


def test_each_param_group_applies_its_own_weight_decay_and_lr():
    """A no-decay group next to a decayed one: only the second shrinks, by exactly (1 − lr·wd).

    At p = p0 the loss ½‖p − p0‖² has zero gradient, so m = 0 and the Adam part of the
    step is exactly zero: what is left is the decoupled decay of each group's own lr·wd.
    """
    p0 = torch.tensor([1.0, -2.0, 3.0])
    no_decay = p0.clone().requires_grad_(True)
    decay = p0.clone().requires_grad_(True)
    opt = AdaHessian([{"params": [no_decay], "weight_decay": 0.0},
                      {"params": [decay], "weight_decay": 0.1, "lr": 0.3}], lr=0.05, weight_decay=0.5, seed=0)
    loss = 0.5 * ((no_decay - p0) ** 2).sum() + 0.5 * ((decay - p0) ** 2).sum()
    loss.backward(create_graph=True)
    opt.step()
    assert torch.equal(no_decay.detach(), p0)
    assert torch.equal(decay.detach(), p0 * (1 - 0.3 * 0.1))


# =====================================================================================
# Implementations and precisions
# =====================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.0], ids=["power_1", "power_half", "power_0"])
def test_foreach_and_for_loop_implementations_give_identical_parameters(hessian_power, dtype):
    """Bitwise, not just close: on CPU the ``torch._foreach_*`` ops run the same elementwise
    kernels in the same order as the for-loop (lerp, mul, addcmul, div, sqrt/pow, add,
    addcdiv), so any difference means the two paths compute different formulas."""
    kwargs = dict(lr=0.05, weight_decay=0.01, hessian_power=hessian_power, hessian_interval=2,
                  block_size=2, seed=3)
    runs = []
    for foreach in (False, True):
        model = tiny_mlp(0, dtype)
        opt = AdaHessian(model.parameters(), foreach=foreach, **kwargs)
        _train(model, opt, 6)
        runs.append((clone_params(model), opt))
    (p_loop, opt_loop), (p_foreach, opt_foreach) = runs
    assert not torch.equal(p_loop[0], clone_params(tiny_mlp(0, dtype))[0]), "the runs did train"
    assert_all_equal(p_foreach, p_loop, "parameter")
    for key in ("exp_avg", "exp_hessian_diag_sq"):
        assert_all_equal([s[key] for s in opt_foreach.state.values()], [s[key] for s in opt_loop.state.values()], key)


def test_bf16_parameters_keep_fp32_state_through_a_checkpoint():
    """Moments of a bf16 parameter are fp32 (bf16 v would lose the small Hessian entries), and
    stay fp32 through state_dict -> torch.save -> torch.load -> load_state_dict, although
    torch.optim's loader casts state to the parameter's dtype."""
    model = tiny_mlp(0, torch.bfloat16)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0)
    _train(model, opt, 3)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_hessian_diag_sq"].dtype == torch.float32
    saved = {i: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_hessian_diag_sq")}
             for i, p in enumerate(model.parameters())}
    # The saved state really uses fp32 precision: a bf16 round trip would change it.
    assert any(not torch.equal(s["exp_avg"], s["exp_avg"].bfloat16().float()) for s in saved.values())

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    restored_model = copy_model(model)
    restored = AdaHessian(restored_model.parameters(), lr=0.05, seed=0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for i, p in enumerate(restored_model.parameters()):
        for key, value in saved[i].items():
            assert restored.state[p][key].dtype == torch.float32, key
            assert torch.equal(restored.state[p][key], value), key


def test_float64_parameters_are_not_rounded_to_float32():
    """An fp64 parameter must keep fp64 precision: fp32 state is for low-precision parameters.

    At p = p0 the gradient of ½‖p − p0‖² is zero, so the step is exactly zero and p
    must stay bit-for-bit p0 — including 1 + 1e-10, which float32 cannot represent.
    """
    p0 = torch.tensor([1 + 1e-10, -3.0000000001, 2.0], dtype=torch.float64)
    for foreach in (False, True):
        p = p0.clone().requires_grad_(True)
        opt = AdaHessian([p], lr=0.1, seed=0, foreach=foreach)
        (0.5 * ((p - p0) ** 2).sum()).backward(create_graph=True)
        opt.step()
        assert torch.equal(p.detach(), p0), f"foreach={foreach}: {(p.detach() - p0).tolist()}"


# =====================================================================================
# Checkpoints
# =====================================================================================
@pytest.mark.parametrize("settings", [{}, {"stale_guard": True, "time_weighted": True, "hessian_interval": 2}])
def test_every_parameter_saves_the_same_keys_and_loads_back_only_its_own(settings):
    """torch.distributed.checkpoint (FSDP2's resume) loads only keys the state it loads into
    has, so each parameter's saved entry carries every key; those a parameter does not have
    come back absent, and a save-load round trip gives the same state."""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=1, **settings)
    _train(model, opt, 3)
    saved = opt.state_dict()
    keys = {frozenset(entry) for entry in saved["state"].values()}
    assert len(keys) == 1 and {"row_hessian_steps", "grad_norm_avg", "hessian_weight"} <= next(iter(keys))
    assert saved["param_groups"][0]["adahessian"] == saved["adahessian"]

    fresh = AdaHessian(copy_model(model).parameters(), lr=0.05, seed=7, **settings)
    fresh.load_state_dict(saved)
    for p_fresh, p in zip(fresh.param_groups[0]["params"], opt.param_groups[0]["params"]):
        assert set(fresh.state[p_fresh]) == set(opt.state[p])
    assert "adahessian" not in fresh.param_groups[0] and fresh.stats == opt.stats


def test_a_step_at_lr_0_on_zero_gradients_makes_the_state_a_checkpoint_loads_into():
    """What torch.distributed.checkpoint does before loading (``_init_optim_state``): no
    curvature is needed, and nothing moves."""
    model = tiny_mlp(0)
    before = clone_params(model)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=1)
    opt.param_groups[0]["lr"] = 0.0  # as torch.distributed.checkpoint sets it
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    assert_all_equal(clone_params(model), before, "parameter")
    opt.param_groups[0]["lr"] = 0.05
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="needs a Hessian-vector product"):
        opt.step()  # a real step still needs its curvature


@pytest.mark.parametrize("resume_at", [2, 3], ids=["before_a_hessian_step", "before_a_lazy_step"])
def test_resuming_from_a_checkpoint_is_identical_to_an_uninterrupted_run(resume_at):
    """Save after ``resume_at`` steps, restore into a fresh model and a fresh optimizer (other
    seed, no state), continue: bitwise the same as never stopping.  This needs the moments,
    the per-parameter and global counters (is_hessian_step depends on them) and the probe
    generator's position to be saved; the checkpoint goes through torch.save/torch.load
    with weights_only=True, i.e. it holds only tensors and plain containers."""
    kwargs = dict(lr=0.05, weight_decay=0.01, hessian_interval=2, n_samples=1, block_size=2)
    total = 7

    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), seed=123, **kwargs)
    _train(model, opt, total)

    first = tiny_mlp(0)
    first_opt = AdaHessian(first.parameters(), seed=123, **kwargs)
    _train(first, first_opt, resume_at)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)

    resumed = tiny_mlp(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = AdaHessian(resumed.parameters(), seed=0, **kwargs)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, total - resume_at, first_step=resume_at)

    assert_all_equal(clone_params(resumed), clone_params(model), "parameter")
    assert resumed_opt.counters == opt.counters
    assert resumed_opt.seed == opt.seed == 123
    for p_resumed, p in zip(resumed.parameters(), model.parameters()):
        s_resumed, s = resumed_opt.state[p_resumed], opt.state[p]
        assert (s_resumed["step"], s_resumed["hessian_step"]) == (s["step"], s["hessian_step"])
        assert_all_equal([s_resumed[k] for k in ("exp_avg", "exp_hessian_diag_sq")],
                         [s[k] for k in ("exp_avg", "exp_hessian_diag_sq")], "moment")

    # The probes matter here, so the equality above does test that their stream was restored
    # (they are drawn from (seed, step, parameter): the seed and the step counter are what resume needs).
    other_seed = tiny_mlp(0)
    _train(other_seed, AdaHessian(other_seed.parameters(), seed=124, **kwargs), total)
    assert not torch.equal(clone_params(other_seed)[0], clone_params(model)[0])


# =====================================================================================
# Feeding the Hessian: standalone and micro-batch APIs
# =====================================================================================
def test_micro_batches_accumulate_to_the_full_batch_estimate_and_step():
    """k micro-batches of loss_i / k, all with the step's pinned probes, estimate z ⊙ (Σ H_i / k) z:
    the full batch's z ⊙ Hz.  Equal up to float32 re-association of the sums (the batch
    mean and the sum of micro-batch means add in different orders): tight tolerance."""
    k = 4
    full, micro = tiny_mlp(0), tiny_mlp(0)
    opt_full = AdaHessian(full.parameters(), lr=0.05, seed=5)
    opt_micro = AdaHessian(micro.parameters(), lr=0.05, seed=5)
    for step in range(3):
        x, y = regression_batch(step, n=8)
        opt_full.zero_grad()
        opt_full.estimate().accumulate(mse(full, x, y))
        opt_micro.zero_grad()
        estimate = opt_micro.estimate()
        for xi, yi in zip(x.chunk(k), y.chunk(k)):
            estimate.accumulate(mse(micro, xi, yi) / k)
            assert opt_micro.estimate() is estimate  # one estimate for the whole step
        # Signed sums of O(1) terms that partly cancel: an absolute tolerance of ~100 float32
        # ulps of the terms (measured error: below 2e-6).
        for got, expected in zip(opt_micro.estimate().sums, opt_full.estimate().sums):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for p_micro, p_full in zip(micro.parameters(), full.parameters()):
            torch.testing.assert_close(p_micro.grad, p_full.grad, rtol=1e-5, atol=1e-5)
        opt_full.step()
        opt_micro.step()
        for p_micro, p_full in zip(micro.parameters(), full.parameters()):
            torch.testing.assert_close(p_micro, p_full, rtol=1e-5, atol=1e-6)


def test_standalone_backward_path_equals_the_accumulate_path():
    """``loss.backward(create_graph=True); step()`` and ``estimate().accumulate(loss); step()``
    draw the same probes from the same seed and compute the same products: bitwise equal."""
    models = []
    for path in ("standalone", "accumulate"):
        model = tiny_mlp(0)
        opt = AdaHessian(model.parameters(), lr=0.05, block_size=2, seed=9)
        _train(model, opt, 4, path=path)
        models.append(model)
    assert_all_equal(clone_params(models[0]), clone_params(models[1]), "parameter")


class _WithUnusedLayer(torch.nn.Module):
    """The tiny MLP plus a layer that the forward pass never uses (think of an unused pooler)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(3, 3)
        self.net = tiny_mlp(0)

    def forward(self, x):
        return self.net(x)


def test_standalone_path_equals_accumulate_path_with_an_unused_parameter():
    """Same promise as above, with an unused parameter in the model.

    ``hutchinson_diagonal`` draws a probe for every parameter "so the probe stream does
    not depend on which parameters happen to have a Hessian path".  The accumulate path
    passes all trainable parameters; the standalone path must draw the same probes,
    although the unused parameter has no ``.grad``.
    """
    models = []
    for path in ("standalone", "accumulate"):
        model = _WithUnusedLayer()
        with torch.no_grad():
            model.unused.weight.fill_(0.5)
            model.unused.bias.fill_(0.5)
        opt = AdaHessian(model.parameters(), lr=0.05, seed=9)
        _train(model, opt, 3, path=path)
        models.append(model)
    assert_all_equal(clone_params(models[0].net), clone_params(models[1].net), "used parameter")


def test_no_gradient_carries_a_graph_after_accumulate_or_a_standalone_step():
    """A grad with a graph keeps the whole double-backward graph alive (grad -> graph -> param
    -> grad is a cycle): accumulate stores detached grads, step() detaches them."""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0)
    x, y = regression_batch(0)
    opt.estimate().accumulate(mse(model, x, y))
    assert all(p.grad is not None and not p.grad.requires_grad and p.grad.grad_fn is None
               for p in model.parameters())
    opt.step()

    opt.zero_grad()
    mse(model, x, y).backward(create_graph=True)
    assert all(p.grad.requires_grad for p in model.parameters())  # the precondition
    opt.step()
    assert all(not p.grad.requires_grad and p.grad.grad_fn is None for p in model.parameters())


def test_scale_divides_the_hessian_estimate_but_not_the_gradient():
    """With an AMP loss scale S, the Hessian estimate is stored unscaled while .grad stays
    scaled for the GradScaler to unscale.  S is a power of two, so scaling is exact."""
    scale = 1024.0
    x, y = regression_batch(0)
    plain_model, scaled_model = tiny_mlp(0), tiny_mlp(0)
    plain = AdaHessian(plain_model.parameters(), seed=1)
    scaled = AdaHessian(scaled_model.parameters(), seed=1)
    plain.estimate().accumulate(mse(plain_model, x, y))
    scaled.estimate().accumulate(mse(scaled_model, x, y) * scale, scale=scale)
    assert_all_equal(scaled.estimate().sums, plain.estimate().sums, "Hessian estimate")
    assert_all_equal([p.grad for p in scaled_model.parameters()],
                     [p.grad * scale for p in plain_model.parameters()], "gradient")


def test_step_accepts_a_closure_that_does_the_double_backward():
    x, y = regression_batch(0)
    with_closure, without = tiny_mlp(0), tiny_mlp(0)
    opt_c = AdaHessian(with_closure.parameters(), lr=0.05, seed=2)
    opt_n = AdaHessian(without.parameters(), lr=0.05, seed=2)

    def closure():
        opt_c.zero_grad()
        loss = mse(with_closure, x, y)
        loss.backward(create_graph=True)
        return loss

    returned = opt_c.step(closure)
    mse(without, x, y).backward(create_graph=True)
    opt_n.step()
    assert torch.equal(returned.detach(), mse(tiny_mlp(0), x, y))
    assert_all_equal(clone_params(with_closure), clone_params(without), "parameter")


def test_optimizer_steps_never_touch_the_global_rng():
    """Probes come from the optimizer's own generator (seed=None takes torch.initial_seed()
    without drawing), so adding AdaHessian does not change dropout masks or data order."""
    before = torch.get_rng_state()
    for seed, path in ((None, "standalone"), (4, "accumulate")):
        model = tiny_mlp(0)
        _train(model, AdaHessian(model.parameters(), lr=0.05, n_samples=2, seed=seed), 3, path=path)
    assert torch.equal(torch.get_rng_state(), before)


# =====================================================================================
# Lazy Hessian (hessian_interval)
# =====================================================================================
def test_hessian_steps_are_1_then_every_interval():
    p = torch.zeros(3, requires_grad=True)
    opt = AdaHessian([p], hessian_interval=3, seed=0)
    schedule = []
    for _ in range(10):
        schedule.append(opt.is_hessian_step())
        opt.zero_grad()
        _backward_for(opt, ((p - 1) ** 2).sum())
        opt.step()
    # Steps 1, 4, 7, 10.
    assert schedule == [True, False, False, True, False, False, True, False, False, True]
    assert opt.counters["hessian_updates"] == 4
    assert opt.state[p]["hessian_step"] == 4 and opt.state[p]["step"] == 10


def test_lazy_steps_take_a_plain_backward_and_reuse_v_but_hessian_steps_require_a_graph():
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, hessian_interval=3, seed=0)
    x, y = regression_batch(0)
    mse(model, x, y).backward(create_graph=True)
    opt.step()  # step 1: Hessian
    v_after_first = [opt.state[p]["exp_hessian_diag_sq"].clone() for p in model.parameters()]

    for _ in range(2):  # steps 2 and 3: lazy, no double backward needed
        assert not opt.is_hessian_step()
        before = clone_params(model)
        opt.zero_grad()
        mse(model, x, y).backward()
        opt.step()
        assert not torch.equal(clone_params(model)[0], before[0]), "a lazy step still moves the parameters"
        assert_all_equal([opt.state[p]["exp_hessian_diag_sq"] for p in model.parameters()], v_after_first, "v")

    assert opt.is_hessian_step()  # step 4
    opt.zero_grad()
    mse(model, x, y).backward()
    before = clone_params(model)
    with pytest.raises(RuntimeError, match=r"create_graph=True"):
        opt.step()
    # The failed step changed nothing, so the loop can redo it correctly.
    assert opt.counters["step"] == 3 and opt.is_hessian_step()
    assert_all_equal(clone_params(model), before, "parameter")


# =====================================================================================
# Non-finite Hessian estimates
# =====================================================================================
class _NanCurvature(torch.autograd.Function):
    """Identity whose derivative is NaN: as a gradient, its value is finite but its Hz is NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_infinite_curvature_skips_the_hessian_update_and_keeps_v():
    """Σ b_i^1.5 at b = 0 has a finite gradient (0) but an infinite second derivative
    (0.75 b^-0.5): the estimate is not finite, so v is not updated and the skip is counted."""
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = AdaHessian([a, b], lr=0.05, seed=0)
    ((a**2).sum() + (b**2).sum()).backward(create_graph=True)
    opt.step()
    v = [opt.state[p]["exp_hessian_diag_sq"].clone() for p in (a, b)]
    assert torch.equal(b.detach(), torch.zeros(3))  # zero gradient: b stays at the singular point

    opt.zero_grad()
    ((a**2).sum() + b.pow(1.5).sum()).backward(create_graph=True)
    assert torch.isfinite(b.grad).all()  # the precondition: only the curvature is not finite
    opt.step()
    assert_all_equal([opt.state[p]["exp_hessian_diag_sq"] for p in (a, b)], v, "v")
    assert opt.counters == {"step": 2, "hessian_updates": 1, "skipped_hessian_updates": 1, "skipped_steps": 0}
    assert opt.state[a]["hessian_step"] == 1
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_nan_hessian_from_accumulate_skips_the_update_and_keeps_v():
    p = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    opt = AdaHessian([p], lr=0.05, seed=0)
    opt.estimate().accumulate((p**4).sum())
    opt.step()
    v = opt.state[p]["exp_hessian_diag_sq"].clone()

    # A "gradient" equal to p, whose derivative (so Hz) is NaN.
    opt.zero_grad()
    opt.estimate().accumulate(grads=[_NanCurvature.apply(p)])
    assert torch.isfinite(p.grad).all()
    opt.step()
    assert torch.equal(opt.state[p]["exp_hessian_diag_sq"], v)
    assert opt.counters["skipped_hessian_updates"] == 1 and opt.counters["hessian_updates"] == 1
    assert torch.isfinite(p).all()


def test_a_first_hessian_estimate_that_is_not_finite_only_accumulates_momentum():
    """With no v yet, the step would be m/eps; the parameter waits for a finite estimate."""
    p = torch.tensor([0.5, -1.0], requires_grad=True)
    opt = AdaHessian([p], lr=0.05, seed=0)
    opt.estimate().accumulate(grads=[_NanCurvature.apply(p)])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -1.0]))
    assert torch.equal(opt.state[p]["exp_avg"], 0.1 * torch.tensor([0.5, -1.0]))
    assert opt.counters["skipped_hessian_updates"] == 1 and opt.state[p]["hessian_step"] == 0


# =====================================================================================
# Convergence
# =====================================================================================
_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def _steps_to_target(opt_factory, x0, loss_fn, target, max_steps, hessian):
    x = x0.clone().requires_grad_(True)
    opt = opt_factory([x])
    for step in range(max_steps):
        opt.zero_grad()
        loss = loss_fn(x)
        if loss.item() <= target:
            return step
        loss.backward(create_graph=hessian)
        opt.step()
    return math.inf


def test_adahessian_beats_adam_at_its_best_lr_on_an_ill_conditioned_quadratic():
    """½ Σ h_i x_i², h log-spaced over [1, 1e4] (condition number 1e4), from x0 ~ N(0, 1),
    down to 1e-4 of the initial loss.

    The curvature is diagonal, which is where a diagonal preconditioner should shine:
    AdaHessian at its untuned default lr (0.15) scales each coordinate by its curvature.
    Adam gets the best lr of a grid.  Measured: AdaHessian 10 steps; Adam 72 at its best
    (lr 0.3; 77 at 0.1, 95 at 0.03; lr 1.0, outside the grid, is no better: 69).  We assert
    a third of Adam's best.  (With strongly coupled curvature, e.g. a dense Hessian with
    correlations 0.3, or Rosenbrock, the one-probe diagonal is noisy and this advantage
    does not hold; that is not what this test claims.)
    """
    h = torch.logspace(0, 4, 10)
    x0 = torch.randn(10, generator=torch.Generator().manual_seed(0))

    def loss_fn(x):
        return 0.5 * (h * x * x).sum()

    target = 1e-4 * loss_fn(x0).item()
    adam = {lr: _steps_to_target(lambda ps: torch.optim.Adam(ps, lr=lr), x0, loss_fn, target, 4000, False)
            for lr in _ADAM_LRS}
    adahessian = _steps_to_target(lambda ps: AdaHessian(ps, seed=0), x0, loss_fn, target, 4000, True)
    best_adam = min(adam.values())
    assert best_adam < math.inf
    assert adahessian <= best_adam / 3, f"AdaHessian {adahessian} steps, Adam by lr {adam}"


# =====================================================================================
# Bad input
# =====================================================================================
_BAD_ARGUMENTS = [
    ("lr", 0.0, "positive"),
    ("lr", -0.1, "positive"),
    ("betas", (1.0, 0.999), "[0, 1)"),
    ("betas", (0.9, 1.0), "[0, 1)"),
    ("betas", (-0.1, 0.999), "[0, 1)"),
    ("betas", (0.9, -0.1), "[0, 1)"),
    ("eps", 0.0, "positive"),
    ("eps", -1e-8, "positive"),
    ("weight_decay", -0.01, ">= 0"),
    ("hessian_power", -0.1, "[0, 1]"),
    ("hessian_power", 1.5, "[0, 1]"),
    ("hessian_interval", 0, ">= 1"),
    ("hessian_interval", -2, ">= 1"),
    ("hessian_interval", 2.5, "integer"),
    ("hessian_interval", 2.0, "integer"),
    ("n_samples", 0, ">= 1"),
    ("n_samples", 1.5, "integer"),
    ("hessian_warmup_interval", 0, ">= 1"),
    ("hessian_warmup_interval", 1.5, "integer"),
    ("block_size", 0, ">= 1"),
    ("block_size", -32, ">= 1"),
]


def _ids(cases):
    return [f"{name}={value!r}" for name, value, _ in cases]


@pytest.mark.parametrize("name, value, valid_range", _BAD_ARGUMENTS, ids=_ids(_BAD_ARGUMENTS))
def test_bad_constructor_argument_raises_value_error_naming_it_and_its_range(name, value, valid_range):
    with pytest.raises(ValueError, match=rf"\b{name}=.*{re.escape(valid_range)}"):
        AdaHessian([torch.zeros(2, requires_grad=True)], **{name: value})


def test_finite_differences_refuse_more_than_one_probe():
    """Each probe of a finite-difference estimate costs a gradient pass: more probes are the exact estimator's."""
    with pytest.raises(ValueError, match=r"n_samples=2; expected 1 with hessian_estimator='finite_difference'"):
        AdaHessian([torch.zeros(2, requires_grad=True)], n_samples=2, hessian_estimator="finite_difference")


_BAD_GROUP_VALUES = [case for case in _BAD_ARGUMENTS
                     if case[0] not in ("hessian_interval", "n_samples", "hessian_warmup_interval")]


@pytest.mark.parametrize("name, value, valid_range", _BAD_GROUP_VALUES, ids=_ids(_BAD_GROUP_VALUES))
def test_bad_per_group_override_raises_value_error_naming_it_and_its_range(name, value, valid_range):
    """The defaults are fine; one group overrides a hyperparameter with a bad value."""
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(3, requires_grad=True)], name: value}]
    with pytest.raises(ValueError, match=rf"\b{name}=.*{re.escape(valid_range)}"):
        AdaHessian(groups, lr=0.1)


# =====================================================================================
# Non-finite gradients
# =====================================================================================
@pytest.mark.parametrize("hessian_step", [True, False], ids=["hessian-step", "lazy-step"])
def test_a_non_finite_gradient_skips_the_step_and_leaves_everything_as_it_was(hessian_step):
    """A bad batch (an inf in one gradient) must not turn the parameters into NaN for good: nothing
    moves, no state changes, the skip is counted, and the next step is the same step again."""
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), lr=0.05, hessian_interval=1 if hessian_step else 2, seed=0)
    _train(model, opt, 1 if hessian_step else 1)
    if not hessian_step:
        assert not opt.is_hessian_step()
    params, counters = clone_params(model), dict(opt.counters)
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.zero_grad()
    x, y = regression_batch(1)
    _backward_for(opt, mse(model, x, y))
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()

    assert_all_equal(clone_params(model), params, "parameter")
    assert opt.counters == {**counters, "skipped_steps": 1}
    for p, before in zip(model.parameters(), state):
        for key, value in before.items():
            assert (torch.equal(opt.state[p][key], value) if torch.is_tensor(value) else opt.state[p][key] == value)
    assert opt.is_hessian_step() == hessian_step  # the same step, again


# =====================================================================================
# Coverage: a coordinate's curvature is what was observed for it
# =====================================================================================
class _Bag(torch.nn.Module):
    """An embedding bag into a nonlinear head: the rows of the tokens in a batch are the only ones it sees."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(6, 3, generator=gen) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(3, generator=gen))

    def forward(self, tokens, target):
        h = torch.tanh(self.emb[tokens].sum(0) * self.head)
        return ((h.sum() - target) ** 2).sum()


def _bag_step(model, opt, tokens, target=1.0):
    opt.zero_grad()
    _backward_for(opt, model(torch.tensor(tokens), target))
    opt.step()


def test_rows_the_estimate_did_not_observe_keep_their_v_and_their_own_bias_correction():
    """Step 1 sees rows 0 and 1, step 2 rows 1 and 2: row 0's v is step 1's (not decayed by β2 on
    a step that did not see it), row 2's v is its first estimate, and each row is bias-corrected by
    its own count of observations (row 1 twice, rows 0 and 2 once)."""
    model = _Bag()
    opt = AdaHessian(model.parameters(), lr=0.01, betas=(0.9, 0.9), seed=0)
    _bag_step(model, opt, [0, 1])
    v1 = opt.state[model.emb]["exp_hessian_diag_sq"].clone()
    assert v1[0].gt(0).all() and v1[2:].eq(0).all()
    _bag_step(model, opt, [1, 2])
    v2 = opt.state[model.emb]["exp_hessian_diag_sq"]
    assert torch.equal(v2[0], v1[0])
    assert v2[2].gt(0).all() and v2[3:].eq(0).all()
    assert opt.state[model.emb]["row_hessian_steps"].tolist() == [1, 2, 1, 0, 0, 0]
    assert opt.state[model.emb]["hessian_step"] == 2


def test_time_weighted_rows_count_the_steps_their_estimates_stand_for():
    """Interval 2, warm-up 1 (Hessian steps 1, 2, 4): step 1 sees rows 0 and 1 (weight 1), step 2 rows 1
    and 2 (weight 2, until step 4), step 4 row 0 (weight 2). Each row's bias correction counts the
    steps its estimates stand for, and a row's v moves only where it was observed."""
    model = _Bag()
    opt = AdaHessian(model.parameters(), lr=0.01, betas=(0.9, 0.9), hessian_interval=2, hessian_warmup=1,
                     time_weighted=True, seed=0)
    _bag_step(model, opt, [0, 1])
    _bag_step(model, opt, [1, 2])
    v2 = opt.state[model.emb]["exp_hessian_diag_sq"].clone()
    _bag_step(model, opt, [1, 2])  # lazy
    _bag_step(model, opt, [0])
    state = opt.state[model.emb]
    assert state["row_hessian_steps"].tolist() == [3, 3, 2, 0, 0, 0]
    assert state["hessian_step"] == 3 and state["hessian_weight"] == 5
    assert torch.equal(state["exp_hessian_diag_sq"][1:], v2[1:])


def test_a_row_never_observed_is_divided_by_the_mean_curvature_of_the_rows_seen_not_by_eps():
    """With hessian_interval=2, token 3 first appears on a lazy step: the paper's rule would step it by
    lr·m̂/eps (300x the gradient at lr 0.03); it takes lr·m̂/(√mean v̂ + eps) with the mean over the rows
    the estimate saw, and rows it never saw in a batch do not move at all."""
    model = _Bag()
    lr = 0.03
    opt = AdaHessian(model.parameters(), lr=lr, hessian_interval=2, seed=0)
    _bag_step(model, opt, [0, 1])          # Hessian step: rows 0 and 1 observed
    before = model.emb.detach().clone()
    _bag_step(model, opt, [1, 3])          # lazy step: row 3 has a gradient, no curvature yet
    state = opt.state[model.emb]
    beta1, beta2 = opt.defaults["betas"]
    v_hat = state["exp_hessian_diag_sq"][:2] / (1 - beta2)
    expected = -lr * (state["exp_avg"][3] / (1 - beta1**2)) / (v_hat.mean().sqrt() + opt.defaults["eps"])
    torch.testing.assert_close(model.emb[3].detach() - before[3], expected, rtol=1e-5, atol=1e-8)
    assert (model.emb[3].detach() - before[3]).abs().max() < 10 * lr  # not m̂/eps
    assert torch.equal(model.emb[4:].detach(), before[4:])  # no gradient, no estimate: untouched


def test_a_row_with_fewer_estimates_than_min_row_estimates_takes_at_least_the_mean_curvature_of_the_rows_seen():
    """Every step a Hessian step; step 1 sees rows 0 and 1, step 2 rows 1 and 2.  With min_row_estimates=2,
    rows 0 and 2 (one estimate each) are divided by √max(own v̂, mean v̂ of rows 0–2), row 1 (two) by its
    own, and a dense tensor is untouched by the setting.  β1 = 0, so m̂ is the gradient."""
    lr, eps = 0.01, 1e-4

    def run(min_row_estimates):
        model = _Bag()
        opt = AdaHessian(model.parameters(), lr=lr, betas=(0.0, 0.9), eps=eps, min_row_estimates=min_row_estimates,
                         seed=0)
        _bag_step(model, opt, [0, 1])
        head_after_one = model.head.detach().clone()
        opt.zero_grad()
        _backward_for(opt, model(torch.tensor([1, 2]), 1.0))
        grad, before = model.emb.grad.detach().clone(), model.emb.detach().clone()
        opt.step()
        return model, opt, head_after_one, grad, before

    model, opt, head, grad, before = run(2)
    state = opt.state[model.emb]
    counts = state["row_hessian_steps"]
    assert counts.tolist() == [1, 2, 1, 0, 0, 0]
    v_hat = state["exp_hessian_diag_sq"][:3] / (1 - 0.9 ** counts[:3, None])
    mean = v_hat.mean()
    floored = torch.where(counts[:3, None] < 2, v_hat.clamp(min=mean), v_hat)
    assert (v_hat[[0, 2]] < mean).any() and (v_hat[[0, 2]] > mean).any()  # the floor binds on some coordinates
    expected = -lr * grad[:3] / (floored.sqrt() + eps)
    # to the parameters' fp32 rounding (half an ulp of 0.5 is 3e-8)
    torch.testing.assert_close(model.emb.detach()[:3] - before[:3], expected, rtol=1e-5, atol=6e-8)
    _, _, head_unfloored, _, _ = run(1)
    assert torch.equal(head, head_unfloored)


def test_min_row_estimates_is_refused_below_one():
    with pytest.raises(ValueError, match="min_row_estimates"):
        AdaHessian([torch.nn.Parameter(torch.zeros(2))], min_row_estimates=0)


def _guarded_bag_with_growth(reference: str, lr: float, eps: float, beta2: float):
    """Four steps of the bag under the stale guard at interval 2 (Hessian steps 1, 3), β1 = 0: rows 0 and 1,
    then the loss ×10 on row 1, row 1, rows 0 and 1.  The model, the embedding's state, the gradient norm
    of each step, and the last step's gradient, weights and v before it."""
    model = _Bag()
    opt = AdaHessian(model.parameters(), lr=lr, betas=(0.0, beta2), eps=eps, hessian_interval=2, stale_guard=True,
                     stale_guard_reference=reference, seed=0)
    norms = []
    for tokens, scale in (([0, 1], 1.0), ([1], 10.0), ([1], 10.0), ([0, 1], 10.0)):
        opt.zero_grad()
        _backward_for(opt, scale * model(torch.tensor(tokens), 1.0))
        norms.append(float(model.emb.grad.detach().norm()))
        grad, before = model.emb.grad.detach().clone(), model.emb.detach().clone()
        state = opt.state[model.emb]
        v_before = state["exp_hessian_diag_sq"].clone() if state else None
        opt.step()
    return model, state, norms, grad, before, v_before


def test_the_stale_guard_scales_each_row_by_the_growth_since_its_own_last_estimate():
    """Interval 2 (Hessian steps 1, 3): step 1 estimates rows 0 and 1, then the loss grows tenfold (a head
    growing) and step 3 estimates row 1 alone.  On step 4 row 1's denominator is scaled by the gradient's
    growth since step 3 and row 0's by its growth since step 1, its own estimate: a tensor-wide reference,
    reset by step 3, would leave row 0 with curvature measured before the growth.  β1 = 0, so the running
    norm is the gradient's norm and m̂ the gradient."""
    lr, eps = 0.01, 1e-4
    model, state, norms, grad, before, v_before = _guarded_bag_with_growth("last", lr, eps, 0.9)
    counts = state["row_hessian_steps"]
    assert counts.tolist()[:2] == [1, 2]
    v_hat = v_before[:2] / (1 - 0.9 ** counts[:2, None])
    factors = torch.tensor([norms[3] / norms[0], norms[3] / norms[2]])[:, None]
    assert factors[0] > 2 * factors[1]  # row 0's estimate predates the growth
    expected = -lr * grad[:2] / (factors * v_hat.sqrt() + eps)
    torch.testing.assert_close(model.emb.detach()[:2] - before[:2], expected, rtol=1e-5, atol=1e-9)
    assert state["row_grad_norm_at_estimate"][:2].tolist() == pytest.approx([norms[0], norms[2]])


def test_a_floored_row_takes_its_own_stale_factor_on_the_mean_curvature():
    """Interval 2 (Hessian steps 1, 3), min_row_estimates=2, the row-wise guard: step 1 estimates rows 0 and 1,
    the loss grows tenfold, step 3 estimates row 1 alone, and lazy step 4 meets row 2, never estimated.  Rows 0
    (one estimate) and 2 (none) are divided by their own factor times √max(own v̂, mean v̂ of the rows seen),
    row 1 by its factor times its own √v̂: the floor is scaled as the row it stands in for.  β1 = 0, so m̂ is
    the gradient."""
    lr, eps, beta2 = 0.01, 1e-4, 0.9
    model = _Bag()
    opt = AdaHessian(model.parameters(), lr=lr, betas=(0.0, beta2), eps=eps, hessian_interval=2, stale_guard=True,
                     min_row_estimates=2, seed=0)
    for tokens, scale in (([0, 1], 1.0), ([1], 10.0), ([1], 10.0), ([0, 1, 2], 10.0)):
        opt.zero_grad()
        _backward_for(opt, scale * model(torch.tensor(tokens), 1.0))
        grad, before = model.emb.grad.detach().clone(), model.emb.detach().clone()
        opt.step()
    state = opt.state[model.emb]
    counts = state["row_hessian_steps"]
    assert counts.tolist()[:3] == [1, 2, 0]
    factors = stale_factors(state, opt.param_groups[0])[:3, None]  # unchanged by the step that used them
    assert factors[0] > 1.5 * factors[1]  # row 0's estimate predates the growth
    v_hat = state["exp_hessian_diag_sq"][:3] / torch.where(counts[:3, None] > 0, 1 - beta2 ** counts[:3, None], 1.0)
    mean = v_hat[:2].mean()
    floored = torch.cat([v_hat[:1].clamp(min=mean), v_hat[1:2], mean.expand(1, 3)])
    expected = -lr * grad[:3] / (factors * floored.sqrt() + eps)
    assert grad[2].abs().min() > 0
    # to the parameters' fp32 rounding (half an ulp of 0.5 is 3e-8)
    torch.testing.assert_close(model.emb.detach()[:3] - before[:3], expected, rtol=1e-5, atol=6e-8)


@pytest.mark.parametrize("reference, row_key", [("last", "row_grad_norm_at_estimate"),
                                                ("average", "row_grad_sq_at_estimates")])
def test_the_row_wise_stale_guard_resumes_bit_for_bit(reference, row_key):
    """Its per-row references are optimizer state: saved, restored, and absent where a tensor has no rows."""
    def run(steps, opt_state=None, model_state=None):
        model = _Bag()
        if model_state is not None:
            model.load_state_dict(model_state)
        opt = AdaHessian(model.parameters(), lr=0.01, hessian_interval=2, stale_guard=True,
                         stale_guard_reference=reference, seed=0)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for tokens in steps:
            _bag_step(model, opt, tokens)
        return model, opt

    sequence = ([0, 1], [1, 2], [2], [0, 3], [3, 4], [1, 5])
    whole, _ = run(sequence)
    first, first_opt = run(sequence[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    assert row_key in first_opt.state[first.emb]
    resumed, resumed_opt = run(sequence[3:], checkpoint["optimizer"], checkpoint["model"])
    assert_all_equal(clone_params(resumed), clone_params(whole), "parameter")
    assert row_key not in resumed_opt.state[resumed.head]


def test_full_coverage_keeps_the_papers_rule_bit_for_bit_with_the_foreach_core():
    """Where every row is observed on every Hessian step no row counter is even made, and the
    foreach and for-loop cores agree bitwise also when some tensors have uneven rows."""
    results = []
    for foreach in (False, True):
        model = _Bag()
        opt = AdaHessian(model.parameters(), lr=0.01, seed=0, foreach=foreach)
        for tokens in ([0, 1, 2, 3, 4, 5], [1, 2], [0, 5], [3]):
            _bag_step(model, opt, tokens)
        results.append((clone_params(model), opt))
    assert "row_hessian_steps" not in results[0][1].state[results[0][1].param_groups[0]["params"][1]]
    assert_all_equal(results[0][0], results[1][0], "parameter")


# =====================================================================================
# What AdaHessian cannot train, said plainly
# =====================================================================================
def test_fp16_parameters_are_refused_with_the_mixed_precision_recipe():
    with pytest.raises(ValueError, match="float16.*fp32.*--fp16"):
        AdaHessian([torch.zeros(3, dtype=torch.float16, requires_grad=True)])


def test_the_standalone_step_on_attention_without_a_double_backward_names_the_fix():
    """Any HF BERT on CPU defaults to SDPA, whose fused kernel has no double backward: the README's own
    standalone loop used to die in torch. The error names the fix, and the fix works."""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_adahessian import double_backward_ready

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    assert model.config._attn_implementation == "sdpa"
    batch = {"input_ids": torch.randint(1, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0)
    model(**batch).loss.backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"double_backward_ready.*attn_implementation=\"eager\".*finite_difference"):
        opt.step()
    opt.zero_grad()
    with double_backward_ready(model):
        model(**batch).loss.backward(create_graph=True)
    opt.step()
    assert opt.counters["hessian_updates"] == 1


# =====================================================================================
# Lazy Hessians: a schedule, a guard on stale curvature, a bounded update
# =====================================================================================
def test_hessian_warmup_estimates_every_step_first_then_every_interval():
    p = torch.zeros(3, requires_grad=True)
    opt = AdaHessian([p], hessian_interval=4, hessian_warmup=3, seed=0)
    schedule = []
    for _ in range(12):
        schedule.append(opt.is_hessian_step())
        opt.zero_grad()
        _backward_for(opt, ((p - 1) ** 4).sum())
        opt.step()
    # Steps 1, 2, 3 (warm-up), then 4, 8, 12.
    assert [i + 1 for i, h in enumerate(schedule) if h] == [1, 2, 3, 4, 8, 12]


def test_a_warmup_interval_spreads_the_warmups_estimates_over_its_steps():
    """hessian_warmup=7 with a Hessian every third warm-up step: steps 1, 4, 7, then every interval from 8;
    the counters and the time weighting's steps covered follow the same schedule."""
    p = torch.zeros(3, requires_grad=True)
    opt = AdaHessian([p], hessian_interval=5, hessian_warmup=7, hessian_warmup_interval=3, seed=0)
    schedule, covered = [], []
    for _ in range(18):
        schedule.append(opt.is_hessian_step())
        covered.append(opt._steps_covered() if schedule[-1] else None)
        opt.zero_grad()
        _backward_for(opt, ((p - 1) ** 4).sum())
        opt.step()
    assert [i + 1 for i, h in enumerate(schedule) if h] == [1, 4, 7, 8, 13, 18]
    assert [c for c in covered if c is not None] == [3, 3, 1, 5, 5, 5]
    assert opt.counters["hessian_updates"] == 6


@pytest.mark.parametrize("foreach", [False, True])
def test_time_weighting_is_the_papers_rule_where_every_step_has_an_estimate(foreach):
    """Interval 1 (or a warm-up covering the run): every estimate stands for one step, β2^1 is β2."""
    runs = []
    for extra in ({}, {"time_weighted": True}, {"time_weighted": True, "hessian_interval": 4, "hessian_warmup": 5}):
        model = tiny_mlp(0)
        _train(model, AdaHessian(model.parameters(), lr=0.05, seed=0, foreach=foreach, **extra), 5)
        runs.append(clone_params(model))
    assert_all_equal(runs[1], runs[0], "parameter")
    assert_all_equal(runs[2], runs[0], "parameter")


@pytest.mark.parametrize("first, then", [(True, False), (False, True)], ids=["weighted, then not", "then weighted"])
def test_the_bias_correction_counts_what_v_holds_when_a_run_resumes_with_time_weighting_switched(first, then):
    """With a constant estimate D, v̂ is D² exactly however the estimates were weighted, if v's bias
    correction counts the weights v holds.  f(p) = ½ a p² (|z ⊙ Hz| = a), β1 = 0, Hessian steps 1, 4, 7, …:
    each step shrinks p by lr·a/(√v̂ + eps), which gives back the √v̂ the step used, before and after a
    resume that switches time weighting on or off."""
    a, lr, eps, beta2 = 2.0, 0.1, 1e-4, 0.9
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    used = []

    def train(opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _backward_for(opt, (0.5 * a * p * p).sum())
            before = float(p)
            opt.step()
            used.append(lr * a / (1 - float(p) / before) - eps)

    opt = AdaHessian([p], lr=lr, betas=(0.0, beta2), eps=eps, hessian_interval=3, time_weighted=first, seed=0)
    train(opt, 5)
    resumed = AdaHessian([p], lr=lr, betas=(0.0, beta2), eps=eps, hessian_interval=3, time_weighted=then, seed=0)
    resumed.load_state_dict(opt.state_dict())
    train(resumed, 5)
    assert used == pytest.approx([a] * 10, rel=1e-9)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_time_weighted_estimate_counts_as_every_step_it_stands_for(foreach):
    """f_t(p) = ½ Σ a_t p², whose |z ⊙ Hz| is a_t exactly, with a_t changing only on the lazy run's
    Hessian steps (warm-up 2, then every 3: steps 1, 2, 3, 6, 9). Interval 1 adds a_t to v on each step
    it holds; the time-weighted lazy run adds it once with the weight of all of them, so its v̂, held
    until the next estimate, is interval 1's v̂ at the last step that a_t holds. The plain lazy EMA
    (one estimate, one weight) is not: it over-weights the warm-up's small curvature."""
    curvatures = {0: [4.0, 0.5], 1: [8.0, 1.0], 2: [16.0, 2.0], 5: [64.0, 4.0], 8: [256.0, 8.0]}
    beta2 = 0.9
    v_hats = {}
    for name, extra in {"every step": {}, "time-weighted": {"time_weighted": True, "hessian_interval": 3,
                                                              "hessian_warmup": 2},
                        "plain lazy": {"hessian_interval": 3, "hessian_warmup": 2}}.items():
        p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        opt = AdaHessian([p], lr=0.01, betas=(0.9, beta2), seed=0, foreach=foreach, **extra)
        v_hats[name] = []
        for step in range(11):
            if step in curvatures:
                a = torch.tensor(curvatures[step], dtype=torch.float64)
            opt.zero_grad()
            _backward_for(opt, (0.5 * a * p * p).sum())
            opt.step()
            state = opt.state[p]
            exponent = state.get("hessian_weight", state["hessian_step"])
            v_hats[name].append(state["exp_hessian_diag_sq"] / (1 - beta2**exponent))
    # The lazy run's v̂ after Hessian step j (0-based: 0, 1, 2, 5, 8) and until the next one.
    last_step_held = {0: 0, 1: 1, 2: 4, 5: 7, 8: 10}
    for j, last in last_step_held.items():
        for held in range(j, last + 1):
            torch.testing.assert_close(v_hats["time-weighted"][held], v_hats["every step"][last],
                                       rtol=1e-12, atol=0)
    # The plain EMA gives each estimate one step's weight: from step 6 on its v̂ is not interval 1's.
    assert not torch.allclose(v_hats["plain lazy"][7], v_hats["every step"][7], rtol=1e-3)


@pytest.mark.parametrize("foreach", [False, True])
def test_the_stale_guard_and_the_update_clip_leave_the_papers_rule_alone_where_they_do_not_bind(foreach):
    """At hessian_interval=1 the stale guard's factor is 1 on every step: bit for bit the plain
    optimizer; a clip far above every |m̂/denominator| clips nothing: the same steps up to the
    rounding of dividing before multiplying (addcdiv fuses them)."""
    runs = []
    for extra in ({}, {"stale_guard": True}, {"update_clip": 1e6},
                  {"stale_guard": True, "stale_guard_reference": "average"}):
        model = tiny_mlp(0)
        _train(model, AdaHessian(model.parameters(), lr=0.05, seed=0, foreach=foreach, **extra), 5)
        runs.append(clone_params(model))
    assert_all_equal(runs[1], runs[0], "parameter")
    assert_all_equal(runs[3], runs[0], "parameter")
    for a, b in zip(runs[2], runs[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_stale_guard_divides_by_the_growth_of_the_gradient_since_the_estimate():
    """f(p) = ½ a p², Hessian a at step 1; then the loss is scaled up tenfold (as a growing head scales
    the curvature upstream): between estimates the guard's denominator grows with the gradient's
    running norm (β1 = 0, so the norm itself), and the step stays the size the fresh estimate gives."""
    a = torch.tensor([2.0, 0.5])
    results = {}
    for guard in (False, True):
        p = torch.tensor([1.0, -1.0], requires_grad=True)
        opt = AdaHessian([p], lr=0.1, betas=(0.0, 0.9), hessian_interval=10, stale_guard=guard, seed=0)
        _backward_for(opt, (0.5 * a * p * p).sum())
        opt.step()
        opt.zero_grad()
        before = p.detach().clone()
        scale = 10.0
        _backward_for(opt, (0.5 * scale * a * p * p).sum())
        opt.step()
        results[guard] = (p.detach() - before, before)
    plain, guarded = results[False][0], results[True][0]
    # The fresh curvature is scale·a: the guarded step is the plain one divided by the gradient growth.
    growth = (scale * a * results[True][1]).norm() / (a * torch.tensor([1.0, -1.0])).norm()
    torch.testing.assert_close(guarded, plain / growth, rtol=1e-3, atol=1e-7)
    assert guarded.abs().max() < plain.abs().max() / 5


def _growing_quadratic_denominators(reference: str | None, interval: int, warmup: int = 0, steps: int = 12):
    """f(p) = ½ s_t a·p², s_t = t, at a learning rate too small to move p: D_t = s_t·a and ‖g_t‖ = s_t‖a p‖
    grow together, as upstream of a growing head.  The denominator (√v̂ times the guard's factor) after each
    step, in float64, at β2 = 0.999 as in the recipes."""
    a = torch.tensor([2.0, 0.5], dtype=torch.float64)
    p = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    guard = {} if reference is None else {"stale_guard": True, "stale_guard_reference": reference}
    opt = AdaHessian([p], lr=1e-12, betas=(0.0, 0.999), hessian_interval=interval, hessian_warmup=warmup, seed=0,
                     **guard)
    denominators = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        _backward_for(opt, (0.5 * t * a * p * p).sum())
        opt.step()
        state = opt.state[p]
        v_hat = state["exp_hessian_diag_sq"] / (1 - 0.999 ** state["hessian_step"])
        factor = stale_factors(state, opt.param_groups[0], reference) if guard else 1.0
        denominators.append(factor * v_hat.sqrt())
    return denominators


def test_the_average_reference_puts_a_lazy_denominator_where_a_hessian_on_every_step_has_it():
    """Where the curvature grows as the gradient does, the guard's factor √(ā_steps/ā_estimates) turns the
    lazy v̂ into the one a Hessian on every step gives, on every step, before and after each new estimate;
    the last-estimate reference overshoots it between estimates and falls under it when an estimate
    resets it."""
    every_step = _growing_quadratic_denominators(None, 1)
    # Estimates on steps 1-6 (the warm-up, then the first of the interval) and 11.
    average = _growing_quadratic_denominators("average", 5, warmup=5)
    last = _growing_quadratic_denominators("last", 5, warmup=5)
    for t, (want, got) in enumerate(zip(every_step, average), start=1):
        # to the rounding of the gradient norms, which the guard takes in fp32
        torch.testing.assert_close(got, want, rtol=1e-7, atol=0, msg=lambda m, t=t: f"step {t}: {m}")
    # On step 10 the last-estimate guard is above the every-step denominator; step 11's estimate resets it
    # and the denominator drops under the every-step one, and under its own of the step before, while
    # the curvature grows.
    assert (last[9] > every_step[9] * 1.03).all() and (last[10] < every_step[10] * 0.9).all()
    assert (last[10] < last[9]).all()


def test_the_average_reference_takes_each_rows_own_estimates_and_the_tensors_steps():
    """Interval 2 (Hessian steps 1, 3): step 1 estimates rows 0 and 1, step 3 row 1 alone, the loss growing
    tenfold after step 1.  On step 4 each row's factor is √(ā over the tensor's four steps / ā over the
    row's own estimates), the averages bias-corrected by their counts as v̂ is.  β1 = 0: m̂ is the gradient."""
    lr, eps, beta2 = 0.01, 1e-4, 0.9
    model, state, norms, grad, before, v_before = _guarded_bag_with_growth("average", lr, eps, beta2)
    counts = state["row_hessian_steps"]
    assert counts.tolist()[:2] == [1, 2]
    n = [x * x for x in norms]
    over_steps = sum((1 - beta2) * beta2 ** (3 - k) * n[k] for k in range(4)) / (1 - beta2**4)
    row_0 = n[0]  # one estimate: (1 − β2)·n₁² / (1 − β2)
    row_1 = (beta2 * (1 - beta2) * n[0] + (1 - beta2) * n[2]) / (1 - beta2**2)
    factors = torch.tensor([math.sqrt(over_steps / row_0), math.sqrt(over_steps / row_1)])[:, None]
    assert factors[0] > 1.5 * factors[1] > 3  # row 0 was last estimated before the growth
    v_hat = v_before[:2] / (1 - beta2 ** counts[:2, None])
    expected = -lr * grad[:2] / (factors * v_hat.sqrt() + eps)
    # to the parameters' fp32 rounding (half an ulp of 0.5 is 3e-8)
    torch.testing.assert_close(model.emb.detach()[:2] - before[:2], expected, rtol=1e-5, atol=6e-8)


@pytest.mark.parametrize("saved, reference", [(None, "last"), (None, "average"), ("last", "average"),
                                             ("average", "last")])
def test_a_guard_turned_on_or_switched_at_a_resume_starts_from_no_growth(saved, reference):
    """A checkpoint saved without the guard, or with the other reference, has no history for the guard now
    asked for: it starts as if the gradient had kept the scale it has, so where the scale does not change
    (f = ½ a p² at a learning rate too small to move p) the factor stays 1 on every step after the resume."""
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)

    def make(guard_reference):
        guard = {} if guard_reference is None else {"stale_guard": True, "stale_guard_reference": guard_reference}
        return AdaHessian([p], lr=1e-12, hessian_interval=2, seed=0, **guard)

    def step(opt):
        opt.zero_grad()
        _backward_for(opt, (0.5 * torch.tensor([2.0, 0.5], dtype=torch.float64) * p * p).sum())
        opt.step()

    first = make(saved)
    for _ in range(5):
        step(first)
    resumed = make(reference)
    resumed.load_state_dict(first.state_dict())
    factors = []
    for _ in range(6):
        step(resumed)
        factors.append(stale_factors(resumed.state[p], resumed.param_groups[0], reference))
    assert factors == pytest.approx([1.0] * 6, rel=1e-6)


@pytest.mark.parametrize("saved, reference", [(None, "last"), (None, "average"), ("last", "average")])
def test_a_guard_turned_on_or_switched_at_a_resume_starts_every_row_from_no_growth(saved, reference):
    """The same for an embedding whose rows are counted apart, each with its own number of estimates: on the
    first step after the resume (a Hessian step) every row's factor is 1, and on the next, with the loss
    grown tenfold, every row's factor is the same growth since the resume."""
    model = _Bag()

    def make(guard_reference):
        guard = {} if guard_reference is None else {"stale_guard": True, "stale_guard_reference": guard_reference}
        return AdaHessian(model.parameters(), lr=0.01, hessian_interval=2, seed=0, **guard)

    first = make(saved)
    for tokens in ([0, 1], [1, 2], [2], [1, 3]):
        _bag_step(model, first, tokens)
    resumed = make(reference)
    resumed.load_state_dict(first.state_dict())
    _bag_step(model, resumed, [0, 2])
    state = resumed.state[model.emb]
    assert len(set(state["row_hessian_steps"].tolist())) > 2  # rows with different counts
    factors = stale_factors(state, resumed.param_groups[0], reference)
    assert factors.tolist() == pytest.approx([1.0] * 6, rel=1e-6)
    resumed.zero_grad()
    _backward_for(resumed, 10.0 * model(torch.tensor([0, 2]), 1.0))
    resumed.step()
    factors = stale_factors(state, resumed.param_groups[0], reference).tolist()
    assert factors[0] > 1.5 and factors == pytest.approx([factors[0]] * 6, rel=2e-5)  # fp32 row state


def test_the_stale_guards_reference_is_refused_unless_it_is_one_the_guard_knows_and_the_guard_is_on():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="stale_guard_reference='median'.*'last' or 'average'"):
        AdaHessian([p], stale_guard=True, stale_guard_reference="median")
    with pytest.raises(ValueError, match="stale_guard_reference='average'.*turn the guard on"):
        AdaHessian([p], stale_guard_reference="average")


@pytest.mark.parametrize("foreach", [False, True])
def test_update_clip_bounds_every_coordinates_step_by_lr_times_the_clip(foreach):
    """A coordinate with almost no curvature (v ≈ 0) takes lr·m̂/eps, huge; with update_clip=c no
    coordinate moves by more than lr·c (weight decay aside), and well-curved ones are untouched."""
    lr, clip = 0.1, 2.0
    steps = {}
    for c in (None, clip):
        p = torch.tensor([1.0, 1.0], requires_grad=True)
        opt = AdaHessian([p], lr=lr, update_clip=c, seed=0, foreach=foreach)
        opt.zero_grad()
        _backward_for(opt, (2.0 * p[0] ** 2 + 1e-3 * p[1] + 1e-12 * p[1] ** 2))
        before = p.detach().clone()
        opt.step()
        steps[c] = (p.detach() - before).abs()
    # The flat coordinate: lr·m̂/(√v̂ + eps) = 0.1·1e-3/(2e-12 + 1e-4) = 1.0, ten times the curved one's.
    assert steps[None][1].item() == pytest.approx(1.0, rel=1e-4)
    assert steps[clip][1].item() == pytest.approx(lr * clip)
    # The curved one (m̂/√v̂ = 1): not clipped.
    assert steps[clip][0] == steps[None][0] == pytest.approx(lr, rel=1e-3)


# =====================================================================================
# clip_hessian: a clipped gradient's step is the step of the scaled loss
# =====================================================================================


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("settings", [{}, {"hessian_interval": 3},
                                      {"hessian_interval": 3, "stale_guard": True, "stale_guard_reference": "average"}],
                         ids=["every step", "every third", "every third, guarded"])
def test_clip_hessian_makes_a_clipped_step_the_step_of_the_loss_scaled_by_the_clip_factor(foreach, settings):
    """Clipping multiplies the gradient by c; the loss c·f has gradient c·g and curvature c·H.  Told c,
    the optimizer takes c·f's step, in float64 to rounding, with c changing from step to step."""
    factors = [0.3, 1.0, 0.05, 0.5, 0.8, 0.2]
    runs = {}
    for path in ("scaled loss", "clipped"):
        model = tiny_mlp(0, torch.float64)
        opt = AdaHessian(model.parameters(), lr=0.05, seed=0, foreach=foreach, clip_hessian=True, **settings)
        for step, factor in enumerate(factors):
            opt.zero_grad()
            x, y = regression_batch(step, dtype=torch.float64)
            loss = mse(model, x, y)
            if path == "scaled loss":
                _backward_for(opt, factor * loss)
            else:
                _backward_for(opt, loss)
                with torch.no_grad():  # as clip_grad_norm_ does: the graph still holds the unclipped gradient
                    for p in model.parameters():
                        p.grad.mul_(factor)
                if factor != 1.0:  # an unclipped step says nothing: the factor said lasts one step
                    opt.gradient_clipped(factor)
            opt.step()
        runs[path] = clone_params(model)
    for a, b in zip(runs["clipped"], runs["scaled loss"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", [{}, {"hessian_interval": 3}], ids=["every step", "every third"])
def test_a_clip_norm_told_as_a_tensor_takes_the_step_of_its_python_factor_bitwise(dtype, settings):
    """clip_grad_norm_ returns a tensor; the factor made from it on the device is the one Python's
    min(1, max_norm / (norm + 1e-6)) makes from float(norm), so the steps are equal bit for bit."""
    runs = {}
    for told in ("tensor", "python float"):
        model = tiny_mlp(0, dtype)
        opt = AdaHessian(model.parameters(), lr=0.05, seed=0, clip_hessian=True, **settings)
        for step in range(6):
            opt.zero_grad()
            x, y = regression_batch(step, dtype=dtype)
            _backward_for(opt, mse(model, x, y))
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01 if step % 2 else 1e3)
            if told == "tensor":
                opt.gradient_clipped_by_norm(norm, 0.01 if step % 2 else 1e3)
            else:
                opt.gradient_clipped(min(1.0, (0.01 if step % 2 else 1e3) / (float(norm) + 1e-6)))
            opt.step()
        runs[told] = clone_params(model) + [opt.state[p]["exp_hessian_diag_sq"].clone() for p in model.parameters()]
    assert_all_equal(runs["tensor"], runs["python float"], "parameters and v")


class _Dispatched(TorchDispatchMode):
    """The ATen operators run inside, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_a_clip_norm_told_as_a_tensor_is_not_read_on_a_step_without_an_estimate():
    """Reading it would be a host sync every step on a GPU; a step between Hessian steps never
    needs it.  A meta tensor cannot be read at all, so the step would fail if it tried; and
    being told the norm makes no factor (no kernel beyond keeping a detached view of it)."""
    model = tiny_mlp(0, torch.float32)
    opt = AdaHessian(model.parameters(), lr=0.05, seed=0, clip_hessian=True, hessian_interval=3)
    for step in range(3):
        opt.zero_grad()
        x, y = regression_batch(step)
        _backward_for(opt, mse(model, x, y))
        if not opt.is_hessian_step():
            opt.gradient_clipped_by_norm(torch.tensor(5.0, device="meta"), 1.0)
            norm = torch.tensor(5.0)
            with _Dispatched() as told:
                opt.gradient_clipped_by_norm(norm, 1.0)
            assert set(told.names) <= {"detach"}, told.names
        opt.step()
    assert opt.stats.step == 3


def test_without_clip_hessian_the_clip_factor_is_not_applied_to_the_estimate():
    """The default: v is the unclipped loss's whatever the step is told."""
    runs = {}
    for said in (True, False):
        model = tiny_mlp(0, torch.float64)
        opt = AdaHessian(model.parameters(), lr=0.05, seed=0)
        for step in range(2):
            opt.zero_grad()
            x, y = regression_batch(step, dtype=torch.float64)
            _backward_for(opt, mse(model, x, y))
            if said:
                opt.gradient_clipped(0.1)
            opt.step()
        runs[said] = [opt.state[p]["exp_hessian_diag_sq"].clone() for p in model.parameters()]
    assert_all_equal(runs[True], runs[False], "v")


class _WideBag(torch.nn.Module):
    """An embedding of 7 rows into a dense layer: each batch sees some rows, so rows are counted apart."""

    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Parameter((torch.randn(7, 4, generator=gen) * 0.5).to(dtype))
        self.dense = torch.nn.Parameter((torch.randn(4, 3, generator=gen) * 0.5).to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(3, dtype=dtype))

    def forward(self, tokens, target):
        h = torch.tanh(self.emb[tokens].sum(0) @ self.dense + self.bias)
        return ((h.sum() - target) ** 2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slice_elements", [5, 9], ids=["one row a slice", "two rows a slice, a shorter tail"])
@pytest.mark.parametrize("settings", [{}, {"min_row_estimates": 2}, {"hessian_power": 0.5, "weight_decay": 0.1},
                                      {"update_clip": 0.5},
                                      {"hessian_interval": 3, "stale_guard": True, "stale_guard_reference": "average"}],
                         ids=["paper", "row floor", "power 0.5, decay", "update clip", "every third, row-wise guard"])
def test_the_denominator_in_row_slices_takes_the_unsliced_step_bit_for_bit(monkeypatch, dtype, slice_elements,
                                                                            settings):
    """A large tensor's denominator is made a slice of rows at a time, so that no temporary of its size
    exists; each element sees the same operations and the rows' floor the same mean, so slicing every
    tensor of more than ``slice_elements`` entries changes no bit of the parameters or the state."""
    from hf_adahessian import optimizer as core

    batches = [[0, 1], [1, 2, 5], [3], [0, 6, 6], [2, 4], [1]]
    runs = {}
    for sliced in (True, False):
        monkeypatch.setattr(core, "DENOMINATOR_SLICE", slice_elements if sliced else 1 << 40)
        model = _WideBag(dtype)
        opt = AdaHessian(model.parameters(), lr=0.05, betas=(0.9, 0.9), seed=0, foreach=False, **settings)
        for step, tokens in enumerate(batches):
            _bag_step(model, opt, tokens, target=float(step % 2))
        runs[sliced] = clone_params(model) + [opt.state[p][k].clone() for p in model.parameters()
                                              for k in ("exp_avg", "exp_hessian_diag_sq")]
        monkeypatch.undo()
    assert len(core._row_slices(model.emb)) == 1  # the default slice leaves small tensors whole
    monkeypatch.setattr(core, "DENOMINATOR_SLICE", slice_elements)
    assert len(core._row_slices(model.emb)) == (7 if slice_elements == 5 else 4)
    assert "row_hessian_steps" in opt.state[model.emb]  # the row-counted path was taken
    assert_all_equal(runs[True], runs[False], "parameters and state")


def test_the_seen_rows_mean_is_remembered_while_v_and_the_counts_are_unchanged_and_made_again_when_either_moves():
    """The floor's mean v̂ over the rows seen is read once per change of v or of the counts, not on every
    step between estimates; any in-place write to either, or another tensor, makes it again."""
    from hf_adahessian import optimizer as core

    v = torch.tensor([[1.0, 3.0], [5.0, 7.0], [0.0, 0.0]])
    counts = torch.tensor([1.0, 2.0, 0.0])
    rows = core._RowCounts(counts, core._row_bias_correction(counts, 0.5))
    mean = core._seen_rows_mean(v, rows, 0.5)
    assert mean == pytest.approx((4.0 / 0.5 + 12.0 / 0.75) / 4)
    v.data.mul_(2)  # behind the version counter's back: the remembered number comes back
    assert core._seen_rows_mean(v, rows, 0.5) == mean
    v.mul_(1.0)  # an in-place write, even one that changes nothing: made again, from v as it now is
    assert core._seen_rows_mean(v, rows, 0.5) == pytest.approx(2 * mean)
    counts.add_(torch.tensor([0.0, 0.0, 1.0]))  # row 2 seen now, its v still 0: it joins the mean
    rows = core._RowCounts(counts, core._row_bias_correction(counts, 0.5))
    assert core._seen_rows_mean(v, rows, 0.5) == pytest.approx(2 * mean * 4 / 6)
    other = v.clone()  # the same values and version in another tensor: its own entry
    assert core._seen_rows_mean(other, rows, 0.5) == core._seen_rows_mean(v, rows, 0.5)
    # Another β2 (a group's betas changed mid-run) is another bias correction of the same counts.
    assert core._seen_rows_mean(v, core._RowCounts(counts, core._row_bias_correction(counts, 0.9)), 0.9) \
        == pytest.approx((8.0 / 0.1 + 24.0 / 0.19) / 6)


@pytest.mark.parametrize("settings", [{}, {"min_row_estimates": 2, "hessian_interval": 2}],
                         ids=["paper", "row floor, every other step"])
def test_remembering_the_seen_rows_mean_changes_no_bit_of_a_run_resumed_midway(monkeypatch, settings):
    """The same run with the mean made afresh on every step, and remembered, through a checkpoint loaded into
    a new optimizer halfway: the same parameters and state, bit for bit."""
    from hf_adahessian import optimizer as core

    class Forgetful(dict):
        def __setitem__(self, key, value):
            pass

    batches = [[0, 1], [1, 2, 5], [3], [0, 6, 6], [2, 4], [1], [5, 5], [0, 2]]
    runs = {}
    for remembered in (True, False):
        if not remembered:
            monkeypatch.setattr(core, "_SEEN_ROWS_MEANS", Forgetful())
        model = _WideBag(torch.float32)
        opt = AdaHessian(model.parameters(), lr=0.05, betas=(0.9, 0.9), seed=0, **settings)
        for step, tokens in enumerate(batches):
            if step == len(batches) // 2:
                saved = opt.state_dict()
                opt = AdaHessian(model.parameters(), lr=0.05, betas=(0.9, 0.9), seed=0, **settings)
                opt.load_state_dict(saved)
            _bag_step(model, opt, tokens, target=float(step % 2))
        runs[remembered] = clone_params(model) + [opt.state[p][k].clone() for p in model.parameters()
                                                  for k in ("exp_avg", "exp_hessian_diag_sq")]
    assert "row_hessian_steps" in opt.state[model.emb]
    assert_all_equal(runs[True], runs[False], "parameters and state")
