"""Small models, data and comparisons shared by test_optimizer.py and test_hutchinson.py.

Everything here is deterministic and draws from its own ``torch.Generator``, so that
tests can check that the optimizer leaves the global RNG alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 4 -> 6 -> 3 -> 1 tanh MLP: non-quadratic, with 2-D weights and 1-D biases.

    Initialised from its own generator, and built inside ``fork_rng`` (``nn.Linear``'s
    default init draws from the global RNG), so that building it does not move the
    global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return model.to(dtype)


def regression_batch(step: int, n: int = 8, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of training step ``step``: the same for every run, different per step."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 4, generator=gen)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=gen)
    return x.to(dtype), y.to(dtype)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def clone_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def assert_all_equal(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str = "tensor") -> None:
    """Bitwise equality, one tensor at a time, with the index of the first one that differs."""
    assert len(actual) == len(expected), f"{len(actual)} {what}s vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"{what} {i}: dtype {a.dtype} vs {e.dtype}"
        assert torch.equal(a, e), f"{what} {i} differs: max |diff| = {(a.double() - e.double()).abs().max().item():.3e}"
