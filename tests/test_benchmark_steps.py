"""The benchmarks' plain loop clips and steps the way the Trainer does."""

import torch

from benchmarks.steps import finish_step, measure, no_phase
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
