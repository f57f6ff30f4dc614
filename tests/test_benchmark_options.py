"""The comparisons' command line: what a bad option says, and what an override becomes."""

import pytest

from benchmarks.options import comparison_parser, resolve_budget
from benchmarks.specs import Budget, Budgets


def _parser():
    return comparison_parser("benchmarks.x", "", ["adamw_torch", "adahessian_h1"], ["adamw_torch"])


def test_batch_size_defaults_to_the_benchmarks_own_and_takes_a_positive_integer():
    assert _parser().parse_args([]).batch_size is None
    assert _parser().parse_args(["--batch_size", "64"]).batch_size == 64


@pytest.mark.parametrize("bad", ["0", "-4", "sixteen"])
def test_a_bad_batch_size_fails_at_start_up_naming_the_option(bad, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--batch_size", bad])
    err = capsys.readouterr().err
    assert "--batch_size" in err and "positive integer" in err


def test_the_budget_overrides_replace_only_what_was_given():
    budgets = Budgets(quick=Budget(4, 256, 64, 1), full=Budget(150, None, None, 10), search=Budget(60, None, None, 5))
    args = _parser().parse_args(["--max_steps", "20", "--warmup_skip", "5"])
    assert resolve_budget(args, budgets) == Budget(20, None, None, 5)
