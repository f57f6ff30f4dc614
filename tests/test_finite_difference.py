"""The finite-difference estimator: Hz ≈ (∇L(θ + εz) − ∇L(θ)) / ε from two ordinary gradient passes.

It must give the exact estimator's z ⊙ Hz for the same probes to within its stated error,
leave the parameters exactly as the update made them, keep every equivalence the exact
estimator keeps (accumulation, resume; DDP in test_distributed.py), and run where the
double backward cannot: fused SDPA kernels, torch.compile, reentrant checkpointing, a
closure.
"""

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_adahessian import AdaHessian, AdaHessianTrainer, hessian_pass
from optim_helpers import assert_all_equal, clone_params, mse, regression_batch, tiny_mlp

FD = "hessian_estimator=finite_difference"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FirstEstimate(TrainerCallback):
    """The finished estimate of the first step (signed sums), and the parameters the step starts from."""

    def __init__(self):
        self.sums = self.params_before_update = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0:
            est = optimizer.optimizer._estimate
            self.sums = est.terms()  # z ⊙ Hz, whichever estimator made them
            self.params_before_update = [p.detach().clone() for p in model.parameters()]


def first_estimate(make_args, make_bert, make_dataset, optim_args, dropout=0.1, **args):
    model = make_bert(hidden_size=32, num_hidden_layers=2, intermediate_size=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, attn_implementation="eager")
    initial = [p.detach().clone() for p in model.parameters()]
    record = FirstEstimate()
    trainer = AdaHessianTrainer(model=model, args=make_args(max_steps=1, per_device_train_batch_size=16,
                                                            optim_args=optim_args, **args),
                                train_dataset=make_dataset(16, seq_len=12), callbacks=[record])
    trainer.train()
    return torch.cat([s.flatten() for s in record.sums]), record, initial


def relative_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme, mixed, bound", [
    ("forward", {}, 0.02),                       # measured 0.3% at ε = 1e-3·‖θ‖/‖z‖
    ("central", {}, 0.02),                       # measured below 0.01%
    ("forward", {"bf16": True}, 0.15),           # measured 10% at 3e-2 (bf16 rounds the gradient to ~0.4%)
    ("central", {"bf16": True}, 0.05),           # measured 2% at 3e-2
], ids=["forward-fp32", "central-fp32", "forward-bf16", "central-bf16"])
def test_the_estimate_is_within_its_stated_error_of_the_exact_one_for_the_same_probes(
        scheme, mixed, bound, make_args, make_bert, make_dataset):
    """A tiny BERT with dropout on (the same masks in every pass), one Hessian step through the
    Trainer: the signed sums Σ z ⊙ Hz of both estimators, relative L2.  Under bf16 autocast the
    exact one runs in bf16 too."""
    exact, _, _ = first_estimate(make_args, make_bert, make_dataset, "hessian_estimator=exact,hessian_chunks=1", **mixed)
    fd, _, _ = first_estimate(make_args, make_bert, make_dataset, f"{FD},fd_scheme={scheme}", **mixed)
    assert exact.abs().sum() > 0
    assert relative_l2(fd, exact) < bound


def test_the_parameters_come_back_bit_for_bit_before_the_update(make_args, make_bert, make_dataset):
    """θ + εz is undone by subtracting εz and putting back what that rounds differently: the step starts
    from θ exactly."""
    for scheme in ("forward", "central"):
        _, record, initial = first_estimate(make_args, make_bert, make_dataset, f"{FD},fd_scheme={scheme}")
        assert_all_equal(record.params_before_update, initial, "parameter")


def test_accumulating_four_micro_batches_equals_one_large_batch(make_args, make_bert, make_dataset):
    """As for the exact estimator: linearity makes Σ_i z ⊙ (g₊,i − g_i) the large batch's difference.

    In float64, so that the check is of the algebra and not of rounding: in float32 the quotient
    (g₊ − g)/ε carries the gradient's rounding (which differs between one sum and four) amplified by
    1/ε ≈ 1e3 relative, and the parameters after 3 steps differ by 5.8e-3 of how far they moved on
    the coordinates with the smallest denominators (measured, with eps=1e-2); in float64 they agree
    to 4.7e-11 of it, where a scale error (a 4x loss) would be of the order of the movement."""
    dataset = make_dataset(64)
    runs = []
    for batch, steps in [(8, 1), (2, 4)]:
        args = make_args(per_device_train_batch_size=batch, gradient_accumulation_steps=steps, max_steps=3,
                         train_sampling_strategy="sequential", optim_args=f"{FD},eps=1e-2")
        trainer = AdaHessianTrainer(model=make_bert().double(), args=args, train_dataset=dataset)
        trainer.train()
        runs.append(trainer)
    initial = list(make_bert().double().parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(runs[0].model.parameters(), initial))
    assert moved > 1e-2
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9 * moved)
    assert runs[0].adahessian.counters == runs[1].adahessian.counters


def test_resuming_from_a_checkpoint_continues_exactly(make_args, make_bert, make_dataset, tmp_path):
    dataset = make_dataset(64)
    common = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                  optim_args=f"{FD},hessian_interval=2")
    straight = AdaHessianTrainer(model=make_bert(hidden_dropout_prob=0.1), train_dataset=dataset,
                                 args=make_args(output_dir=str(tmp_path / "a"), **common))
    straight.train()
    resumed = AdaHessianTrainer(model=make_bert(seed=1, hidden_dropout_prob=0.1), train_dataset=dataset,
                                args=make_args(output_dir=str(tmp_path / "b"), **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_all_equal(clone_params(resumed.model), clone_params(straight.model), "parameter")
    assert resumed.adahessian.counters == straight.adahessian.counters


class _Bernoullis(TorchDispatchMode):
    """Counts the ``bernoulli_`` kernels (CPU dropout's mask) that run inside."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.bernoulli_.float
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra, replayed", [
    ({"optim_args": FD}, 1),
    ({"optim_args": f"{FD},fd_scheme=central"}, 2),
    ({"optim_args": FD, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}, 2),
    ({"optim_args": FD, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
     1),
    ({"optim_args": f"{FD},fd_scheme=central,hessian_batch_fraction=0.5"}, 1),
], ids=["forward", "central", "accumulation", "reentrant-checkpointing", "central-on-a-sub-batch"])
def test_dropout_masks_drawn_once_give_the_step_of_drawing_them_in_every_pass(
        extra, replayed, make_args, make_bert, make_dataset, monkeypatch):
    """The pass at θ (and the second perturbed one) replays the first pass's dropout masks instead of drawing
    them: the parameters after three steps and the RNG's state after them are those of drawing in every pass,
    bit for bit, and each step draws ``replayed`` passes' worth of masks fewer (central: two passes replay;
    two micro-batches: one each; on a sub-batch: the head's second pass, not the step on the whole batch;
    under checkpointing a pass's masks include those its backward draws again).  Checkpointing recomputes its segments from RNG
    states saved in the forward, which the replay keeps where drawing would have them."""
    dataset = make_dataset(32)

    def bert():
        return make_bert(num_hidden_layers=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
                         attn_implementation="eager")

    model = bert().train()
    if "gradient_checkpointing_kwargs" in extra:
        model.gradient_checkpointing_enable(extra["gradient_checkpointing_kwargs"])
    with _Bernoullis() as one_pass:  # a forward and backward: checkpointing draws again in the backward
        model(torch.tensor(dataset["input_ids"][:8]), labels=torch.tensor(dataset["labels"][:8])).loss.backward()
    runs = {}
    for replay in (True, False):
        monkeypatch.setattr(hessian_pass, "REPLAY_DROPOUT_MASKS", replay)
        trainer = AdaHessianTrainer(model=bert(), args=make_args(max_steps=3, **extra), train_dataset=dataset)
        with _Bernoullis() as drawn:
            trainer.train()
        runs[replay] = (clone_params(trainer.model), torch.get_rng_state(), drawn.count)
    assert_all_equal(runs[True][0], runs[False][0], "parameter")
    assert torch.equal(runs[True][1], runs[False][1])
    assert one_pass.count > 0
    assert runs[False][2] - runs[True][2] == 3 * replayed * one_pass.count


def _profiled_ops(trainer):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train()
    return {e.key for e in prof.key_averages()}


def test_fused_sdpa_runs_on_every_step_and_nothing_is_swapped(make_args, make_bert, make_dataset):
    """SDPA's fused CPU kernel has no double backward, so the exact estimator falls back to the math
    kernel on Hessian steps; finite differences keep the fused kernel on every step."""
    ops = {}
    for estimator in ("exact", "finite_difference"):
        model = make_bert()
        assert model.config._attn_implementation == "sdpa"
        trainer = AdaHessianTrainer(model=model, args=make_args(max_steps=2, optim_args=f"hessian_estimator={estimator}"),
                                    train_dataset=make_dataset(16))
        ops[estimator] = _profiled_ops(trainer)
        assert trainer.adahessian.counters["hessian_updates"] == 2
    fused, math_kernel = "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"
    assert fused in ops["finite_difference"] and math_kernel not in ops["finite_difference"]
    assert math_kernel in ops["exact"]


def test_reentrant_gradient_checkpointing_trains_as_without_checkpointing(make_args, make_bert, make_dataset):
    """Reentrant checkpointing has no double backward (refused for the exact estimator); two plain
    backwards are all finite differences need. Same parameters as the uncheckpointed run."""
    dataset = make_dataset(32)
    runs = []
    for extra in ({}, {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}):
        trainer = AdaHessianTrainer(model=make_bert(num_hidden_layers=2),
                                    args=make_args(max_steps=3, optim_args=FD, **extra), train_dataset=dataset)
        trainer.train()
        runs.append(trainer)
    assert runs[1].model.is_gradient_checkpointing
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_torch_compile_is_allowed_and_trains_as_eager(make_args, make_bert, make_dataset):
    """aot_autograd refuses a double backward; finite differences are two compiled forward/backward
    passes (aot_eager backend on CPU: eager kernels, so the same numbers up to op reordering)."""
    dataset = make_dataset(32)
    runs = []
    for extra in ({}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}):
        trainer = AdaHessianTrainer(model=make_bert(), args=make_args(max_steps=3, optim_args=FD, **extra),
                                    train_dataset=dataset)
        trainer.train()
        runs.append(trainer)
    assert runs[1].adahessian.counters["hessian_updates"] == 3
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- standalone, with a closure


@pytest.mark.parametrize("scheme, calls, bound", [("forward", 2, 1e-2), ("central", 3, 1e-4)])
def test_a_closure_step_estimates_from_repeated_closures_and_returns_the_loss_at_theta(scheme, calls, bound):
    """opt.step(closure), as for LBFGS: the closure runs at θ (its loss is returned, its gradient is
    the step's), then at θ ± εz, and the parameters come back to θ before the update. Against the
    exact estimator on the same probes and data: v after the step within the scheme's error, and
    the same gradient moment bit for bit."""
    x, y = regression_batch(0)
    exact_model, fd_model = tiny_mlp(0), tiny_mlp(0)
    exact = AdaHessian(exact_model.parameters(), lr=0.05, seed=3)
    fd = AdaHessian(fd_model.parameters(), lr=0.05, seed=3, hessian_estimator="finite_difference", fd_scheme=scheme)
    counted = []

    def closure():
        counted.append(1)
        fd.zero_grad()
        loss = mse(fd_model, x, y)
        loss.backward()
        return loss

    at_theta = mse(fd_model, x, y).detach()
    returned = fd.step(closure)
    exact.zero_grad()
    mse(exact_model, x, y).backward(create_graph=True)
    exact.step()

    assert len(counted) == calls
    assert torch.equal(returned.detach(), at_theta)
    v = {name: torch.cat([o.state[p]["exp_hessian_diag_sq"].flatten() for p in model.parameters()])
         for name, o, model in (("exact", exact, exact_model), ("fd", fd, fd_model))}
    assert relative_l2(v["fd"].sqrt(), v["exact"].sqrt()) < bound
    assert_all_equal([fd.state[p]["exp_avg"] for p in fd_model.parameters()],
                     [exact.state[p]["exp_avg"] for p in exact_model.parameters()], "gradient moment")


def test_without_a_closure_the_finite_difference_optimizer_says_how_to_feed_it():
    model = tiny_mlp(0)
    opt = AdaHessian(model.parameters(), hessian_estimator="finite_difference", seed=0)
    mse(model, *regression_batch(0)).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert math.isfinite(next(model.parameters()).sum().item())


def test_on_a_sub_batch_central_differences_estimate_the_heads_curvature(make_args, make_bert, make_dataset):
    """hessian_batch_fraction with finite differences: z ⊙ (g(θ+εz) − g(θ−εz))/2ε on the head of the
    batch (no gradient at θ of the head alone is needed), the gradient from the whole batch: the
    estimate is the exact estimator's on the same head rows, to the central difference's error."""
    estimates = {}
    for estimator in ("exact", "finite_difference"):
        optim_args = f"hessian_estimator={estimator},hessian_batch_fraction=0.25"
        sums, _, _ = first_estimate(make_args, make_bert, make_dataset, optim_args, dropout=0.0)
        estimates[estimator] = sums
    assert relative_l2(estimates["finite_difference"], estimates["exact"]) < 0.02
    full, _, _ = first_estimate(make_args, make_bert, make_dataset, "hessian_estimator=exact", dropout=0.0)
    assert relative_l2(full, estimates["exact"]) > 0.05  # the head's estimate is not the batch's


class _OneUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(3, 2)
        self.unused = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return torch.tanh(self.used(x)).pow(2).sum()


def test_the_perturbed_gradients_land_in_one_buffer_that_the_estimate_keeps():
    """The first perturbed backward of a step accumulates into views of one buffer, which become the sums:
    each the gradient at θ + εz, bit for bit as a backward without them gives it; a parameter the backward
    does not reach gets no sum, as before."""
    from hf_adahessian.estimate import HessianEstimate
    from hf_adahessian.hessian_pass import mark, perturbed_pass

    torch.manual_seed(0)
    model, x, eps = _OneUnused(), torch.randn(5, 3), 1e-3
    params = list(model.parameters())
    estimate = HessianEstimate(params, seed=0, step=1)
    with perturbed_pass(model, estimate, eps):
        mark(model(x)).backward()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(reference.parameters()):
            p.add_(estimate.probe(i), alpha=eps)
    reference(x).backward()
    names = [name for name, _ in model.named_parameters()]
    used = [i for i, name in enumerate(names) if name.startswith("used")]
    assert estimate.sums[names.index("unused")] is None and len(used) == 2
    for i in used:
        assert torch.equal(estimate.sums[i], list(reference.parameters())[i].grad)
    assert len({estimate.sums[i].untyped_storage().data_ptr() for i in used}) == 1
    assert all(p.grad is None for p in params)  # .grad is given back as it was
