"""The benchmarks' optimizer registries: what each row compares at."""

import pytest

from benchmarks import lm, multi30k, sst2


@pytest.mark.parametrize("task", [sst2, multi30k, lm], ids=lambda m: m.NAME)
def test_every_row_compares_at_a_learning_rate_from_its_own_grid(task):
    off_grid = {name: (spec.lr, spec.grid) for name, spec in task.OPTIMIZERS.items() if spec.lr not in spec.grid}
    assert not off_grid


def test_the_every_20_schedule_compares_at_its_own_searched_rate_from_scratch_on_multi30k_only():
    searched = multi30k.OPTIMIZERS["adahessian_h20_b32_fd_w15_sg"]
    # Its own search's pick, inside its grid, not at an edge.
    assert searched.lr == 0.05 and min(searched.grid) < searched.lr < max(searched.grid)
    # Its other rows, and the LM's every-20 row, keep adahessian_h1_b32's rate: none was searched on its own.
    for registry in (multi30k.OPTIMIZERS, lm.OPTIMIZERS):
        followed = [registry["adahessian_h20_b32_fd_w10_sg"]]
        if registry is lm.OPTIMIZERS:
            followed.append(registry["adahessian_h20_b32_fd_w15_sg"])
        assert all(spec.lr == registry["adahessian_h1_b32"].lr for spec in followed)


@pytest.mark.parametrize("task", [multi30k, lm], ids=lambda m: m.NAME)
def test_the_average_reference_row_compares_at_the_rate_of_the_same_schedule_with_the_last_estimate_guard(task):
    """One lever changed against its row: the guard's reference, nothing else, the learning rate included."""
    lever = task.OPTIMIZERS["adahessian_h20_b32_fd_w15_sg_sga"]
    base = task.OPTIMIZERS["adahessian_h20_b32_fd_w15_sg"]
    assert dict(lever.optim_args) == {**base.optim_args, "stale_guard_reference": "average"}
    assert (lever.lr, lever.grid) == (base.lr, base.grid)


@pytest.mark.parametrize("row, beta2", [("adahessian_h20_fd_w15_sg_sga_ch", b) for b in (0.99, 0.95, 0.9)]
                         + [("adahessian_h20_b32_fd_w15_sg_sga_ch", b) for b in (0.95, 0.9)])
def test_a_beta2_row_is_its_row_with_only_the_trainers_adam_beta2_changed(row, beta2):
    registry = multi30k.OPTIMIZERS if "_b32_" in row else sst2.OPTIMIZERS
    lever, base = registry[f"{row}_beta2_{beta2:g}"], registry[row]
    assert (dict(lever.optim_args), lever.lr, lever.grid) == (dict(base.optim_args), base.lr, base.grid)
    assert lever.script_args() == base.script_args() + ["--adam_beta2", f"{beta2:g}"]


@pytest.mark.parametrize("task", ["sst2", "multi30k", "lm"])
def test_the_fused_adamw_row_is_the_baseline_with_only_the_trainers_optim_changed(task):
    """transformers 5's default --optim, there to time the baseline a user gets without the flag."""
    rows = {"sst2": sst2, "multi30k": multi30k, "lm": lm}[task].OPTIMIZERS
    fused, base = rows["adamw_torch_fused"], rows["adamw_torch"]
    assert (fused.lr, fused.grid, fused.path) == (base.lr, base.grid, base.path)
    assert fused.script_args() == [a.replace("adamw_torch", "adamw_torch_fused") for a in base.script_args()]
