"""The benchmarks' optimizer registries: what each row compares at."""

import dataclasses
import re
from pathlib import Path

import pytest

from benchmarks import lm, multi30k, sst2
from hf_adahessian.arguments import parse_optim_args

README = Path(__file__).resolve().parents[1] / "README.md"


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


# Each of the README's recipes and the registry row whose runs its figures are: `python -m benchmarks.<task>
# --optimizers <row>` runs the recipe as the README gives it, with no --lr or --optim_args to add.
RECIPE_ROWS = {
    "fine-tuning a pretrained BERT": (sst2, "adahessian_h1"),
    "fine-tuning at about AdamW's price": (sst2, "adahessian_h20_fd_w15_i3_sg_sga_ch"),
    "training a transformer from scratch": (multi30k, "adahessian_h1_b32"),
    "from scratch at about AdamW's price": (multi30k, "adahessian_h20_b32_fd_w15_sg_sga_ch"),
    "a causal LM (GPT-2) from scratch": (lm, "adahessian_h1_b32"),
    "LoRA adapters on a pretrained BERT": (sst2, "adahessian_h1_f6_fd_lora"),
}


def _readme_recipes() -> dict[str, tuple[float, str]]:
    """setting -> (learning rate, the first `--optim_args` span of its row) from the README's recipe table."""
    section = README.read_text().split("### Recipes", 1)[1].split("\n#", 1)[0]
    recipes = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 3 and cells[0] != "setting" and not set(cells[0]) <= {"-"}:
            recipes[cells[0]] = (float(cells[1]), re.search(r"`([^`]*)`", cells[2]).group(1))
    return recipes


# What the README says of the recipes' figures where the default `hessian_chunks=auto` came after them.
MEASURED_WHOLE = "measured with each micro-batch whole (`hessian_chunks=1`)"


def test_every_readme_recipe_is_a_benchmark_row_at_the_same_learning_rate_and_settings():
    """The same settings, but for the chunk count: the rows measured each micro-batch whole, which
    the README must say where its recipe leaves the count to `auto`."""
    recipes = _readme_recipes()
    assert set(recipes) == set(RECIPE_ROWS), "a new recipe names the benchmark row that measured it here"
    says_whole = MEASURED_WHOLE in " ".join(README.read_text().split())
    for setting, (lr, optim_args) in recipes.items():
        task, row = RECIPE_ROWS[setting]
        spec = task.OPTIMIZERS[row]
        measured = parse_optim_args(",".join(f"{key}={value}" for key, value in spec.optim_args.items()))
        given = parse_optim_args(optim_args)
        if given.hessian_chunks is None and measured.hessian_chunks == 1:
            assert says_whole, f"{setting}: the README must say its figures were {MEASURED_WHOLE}"
            given = dataclasses.replace(given, hessian_chunks=1)
        assert (lr, given) == (spec.lr, measured), setting
