"""The benchmarks' plain loop clips and steps the way the Trainer does; their steps compute what the package does."""

import pytest
import torch

from benchmarks.steps import exact_hessian_step, finish_step, forward_over_reverse_hessian_step, measure, no_phase
from hf_adahessian import AdaHessian


class _Recorded(AdaHessian):
    """Records what the loop tells it, and the gradient ``step()`` sees."""

    def gradient_clipped_by_norm(self, norm, max_norm, measured=None):
        self.told = (float(norm), max_norm, measured)
        super().gradient_clipped_by_norm(norm, max_norm, measured)

    def step(self, closure=None):
        self.grad_at_step = self.param_groups[0]["params"][0].grad.clone()
        return super().step(closure)


def test_a_clipped_step_tells_adahessian_the_norm_and_each_gradients_norm_before_clipping():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)  # norm 4
    optimizer = _Recorded([param], clip_hessian=True, hessian_interval=2)
    optimizer.stats.step = 1  # a step without an estimate
    finish_step(optimizer, [param], no_phase, max_grad_norm=1.0)
    norm, max_norm, (params, norms) = optimizer.told
    assert (norm, max_norm) == (4.0, 1.0)
    assert params == [param] and [float(n) for n in norms] == [4.0]
    torch.testing.assert_close(optimizer.grad_at_step, torch.full((4,), 2.0 / (4.0 + 1e-6)))
    assert param.grad is None


def test_another_optimizer_is_clipped_by_torch():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    seen = []
    optimizer = torch.optim.SGD([param], lr=0.0)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(param.grad.clone()))
    finish_step(optimizer, [param], no_phase, max_grad_norm=1.0)
    torch.testing.assert_close(seen[0], torch.full((4,), 2.0 / (4.0 + 1e-6)))
    assert param.grad is None


def test_interleaved_rounds_in_shuffled_order_time_every_kind_once_a_round_in_changing_order():
    order = []

    def kind(name, seconds):
        def step(phase):
            order.append(name)
            with phase("update"):
                pass
            phase_seconds[name].append(seconds)
        return step

    phase_seconds = {"a": [], "b": [], "c": []}
    kinds = {name: kind(name, 0.0) for name in "abc"}
    summary, rounds, _ = measure(kinds, warmup=1, repeats=5, shuffle=True)
    per_round = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in per_round) and len(per_round) == 6
    assert len({tuple(r) for r in per_round}) > 1, "the order changes from round to round"
    assert all(len(rounds[k]) == 6 for k in kinds) and set(summary["a"]) == {"update", "total"}
    order.clear()
    measure(kinds, warmup=0, repeats=2)
    assert order == ["a", "b", "c"] * 2, "unshuffled rounds keep the kinds' order"


class _Kept(AdaHessian):
    """Keeps the estimate's sums and the gradients that ``step()`` consumes."""

    def step(self, closure=None):
        self.kept_sums = [None if s is None else s.clone() for s in self._estimate.sums]
        self.kept_grads = [p.grad.clone() for p in self.param_groups[0]["params"]]
        return super().step(closure)


@pytest.mark.parametrize("block_size", [1, 4])
def test_forward_over_reverse_gives_the_exact_estimators_estimate_and_gradient(make_bert, block_size):
    """The profiles' forward-over-reverse step measures the same estimate another way: with the same
    probes, Hz from the tangent of the gradient equals Hz from the gradient of g·z."""
    kept = []
    for step in (exact_hessian_step, forward_over_reverse_hessian_step):
        model = make_bert(seed=3).eval()
        batch = {"input_ids": torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1)),
                 "labels": torch.tensor([0, 1, 1, 0])}
        optimizer = _Kept(model.parameters(), lr=1e-3, seed=7, block_size=block_size)
        loss = step(model, batch, optimizer)
        kept.append((optimizer, loss, [p.detach().clone() for p in model.parameters()]))
    (exact, exact_loss, exact_after), (fwd, fwd_loss, fwd_after) = kept
    torch.testing.assert_close(fwd_loss, exact_loss)
    assert sum(s is not None for s in exact.kept_sums) > 10
    for a, b in zip(exact.kept_sums, fwd.kept_sums):
        if a is None:  # no Hessian path: the forward-mode tangent is zero or absent
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(exact.kept_grads, fwd.kept_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(exact_after, fwd_after):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
