"""The lazy-Hessian trace's own pieces (``benchmarks/lazy_trace.py``); CI runs it in quick mode."""

import argparse

import pytest

from benchmarks.lazy_trace import (DEFAULT_SETTINGS, coords_over, parse_settings, window_heaviest, window_max,
                                   window_mean_rms)


def test_settings_parse_into_adahessian_keyword_arguments():
    settings = parse_settings("h10=hessian_interval=10,update_clip=1.0,fd_scheme=central;h1=hessian_interval=1")
    assert settings == {"h10": {"hessian_interval": 10, "update_clip": 1.0, "fd_scheme": "central"},
                        "h1": {"hessian_interval": 1}}
    assert list(parse_settings(DEFAULT_SETTINGS)) == ["h1", "h10", "h10_w15", "h10_w15_sg", "h10_w15_tw", "h10_w15_clip1"]


@pytest.mark.parametrize("text", ["", "h10", "h10=hessian_interval", "h10=hessian_interval=10,embedding=sgd"])
def test_malformed_settings_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_settings(text)


def test_window_max_takes_the_largest_step_inside_the_window_and_skips_unmeasured_steps():
    steps = [{"step": 1, "max_update_over_lr": None, "tensor": "a"},
             {"step": 2, "max_update_over_lr": 3.0, "tensor": "b"},
             {"step": 10, "max_update_over_lr": 7.0, "tensor": "c"},
             {"step": 11, "max_update_over_lr": 50.0, "tensor": "d"}]
    assert window_max(steps, 2, 10) == (7.0, "c (step 10)")
    assert window_max(steps, 11, None) == (50.0, "d (step 11)")
    assert window_max(steps, 12, None) == (None, "–")


def test_coordinates_over_the_threshold_are_summed_over_the_window_only():
    steps = [{"step": 1, "coords_over_10_lr": 100}, {"step": 2, "coords_over_10_lr": 3},
             {"step": 10, "coords_over_10_lr": 4}, {"step": 11, "coords_over_10_lr": 5}]
    assert coords_over(steps, 2, 10) == 7
    assert coords_over(steps, 11, None) == 5
    assert coords_over(steps, 12, None) == 0


def test_the_mean_rms_step_averages_the_measured_steps_inside_the_window():
    steps = [{"step": 1, "rms_update_over_lr": None}, {"step": 2, "rms_update_over_lr": 0.2},
             {"step": 10, "rms_update_over_lr": 0.4}, {"step": 11, "rms_update_over_lr": 5.0}]
    assert window_mean_rms(steps, 1, 10) == pytest.approx(0.3)
    assert window_mean_rms(steps, 11, None) == 5.0
    assert window_mean_rms(steps, 12, None) is None


def test_the_heaviest_tensor_is_the_one_that_most_often_holds_most_of_the_step():
    steps = [{"step": 2, "heaviest_tensor": "emb", "heaviest_share": 0.9},
             {"step": 3, "heaviest_tensor": "head", "heaviest_share": 0.5},
             {"step": 4, "heaviest_tensor": "emb", "heaviest_share": 0.7},
             {"step": 5, "heaviest_tensor": None, "heaviest_share": None}]
    assert window_heaviest(steps, 2, 5) == "emb (80% of it on 2 of 3 steps)"
    assert window_heaviest(steps, 6, None) == "–"


def test_the_embedding_step_is_split_by_when_each_row_was_last_estimated():
    import torch

    from benchmarks.lazy_trace import row_age_shares

    # rows: never, latest Hessian step (36), an earlier one after the warm-up (16), the warm-up (3)
    squares = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    last = torch.tensor([0, 36, 16, 3])
    assert row_age_shares(squares, last, latest=36, dense_until=15) == pytest.approx(
        {"never": 0.1, "latest": 0.2, "earlier": 0.3, "warmup": 0.4})
    # inside the warm-up the latest estimate is not counted as a warm-up one
    assert row_age_shares(squares, torch.tensor([0, 5, 5, 3]), latest=5, dense_until=15) == pytest.approx(
        {"never": 0.1, "latest": 0.5, "earlier": 0.0, "warmup": 0.4})
    assert row_age_shares(torch.zeros(4, dtype=torch.float64), last, 36, 15)["never"] == 0.0


def test_the_embedding_step_is_split_by_how_many_estimates_each_row_rests_on():
    import torch

    from benchmarks.lazy_trace import row_count_shares

    squares = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    counts = torch.tensor([1.0, 2.0, 5.0, 40.0, 0.0])  # the last row, never estimated, is in no bin
    assert row_count_shares(squares, counts) == pytest.approx({"1": 0.05, "2": 0.1, "3–5": 0.15, "6+": 0.2})


def test_the_row_counts_are_the_optimizers_own_or_the_tensors_count_for_every_row():
    import types

    import torch

    from benchmarks.lazy_trace import row_counts

    p, q = torch.zeros(3, 2), torch.zeros(3, 2)
    opt = types.SimpleNamespace(state={p: {"hessian_step": 4, "row_hessian_steps": torch.tensor([0.0, 1.0, 4.0])},
                                       q: {"hessian_step": 4}})
    assert row_counts(opt, p, 3).tolist() == [0.0, 1.0, 4.0]
    assert row_counts(opt, q, 3).tolist() == [4.0, 4.0, 4.0]


def test_the_window_summary_averages_the_age_shares_and_the_guard_factor():
    from benchmarks.lazy_trace import window_ages

    shares = {"never": 0.0, "latest": 0.5, "earlier": 0.5, "warmup": 0.0}
    steps = [{"step": 2, "embedding_share_by_age": shares, "embedding_guard_factor": 1.0},
             {"step": 3, "embedding_share_by_age": {**shares, "latest": 0.0, "warmup": 0.5},
              "embedding_guard_factor": 3.0}]
    assert window_ages(steps, 2, 3) == "never 0% · latest 25% · earlier 50% · warmup 25%; guard ×2.00"
    assert window_ages(steps, 4, None) == "–"
    counts = {"1": 0.5, "2": 0.0, "3–5": 0.0, "6+": 0.5}
    steps[0]["embedding_share_by_count"] = counts
    steps[1]["embedding_share_by_count"] = {**counts, "1": 0.0, "2": 0.5}
    assert window_ages(steps, 2, 3) == ("never 0% · latest 25% · earlier 50% · warmup 25%; "
                                        "by estimates 1 25% · 2 25% · 3–5 0% · 6+ 50%; guard ×2.00")


def test_the_guard_factor_is_the_gradient_growth_since_the_estimate_per_tensor_or_averaged_over_seen_rows():
    import types

    import torch

    from benchmarks.lazy_trace import guard_factor

    p, q, r = (torch.zeros(3, 2) for _ in range(3))
    # β1 = 0.5, step 1: the running norm 2.0 is bias-corrected to 4.0
    state = {p: {"step": 1, "grad_norm_avg": 2.0, "grad_norm_at_estimate": 1.0},
             q: {"step": 1, "grad_norm_avg": 2.0, "row_hessian_steps": torch.tensor([1.0, 2.0, 0.0]),
                 "row_grad_norm_at_estimate": torch.tensor([1.0, 8.0, 0.5])},
             r: {}}
    groups = [{"betas": (0.5, 0.999), "hessian_power": 1.0}]
    opt = types.SimpleNamespace(state=state, param_groups=groups, stale_guard=True, stale_guard_reference="last")
    assert guard_factor(opt, p) == 4.0
    assert guard_factor(opt, q) == 2.5  # rows 0 and 1: 4/1 and max(1, 4/8); row 2 never estimated
    assert guard_factor(opt, r) is None  # not stepped yet
    unguarded = types.SimpleNamespace(state=state, param_groups=groups, stale_guard=False,
                                      stale_guard_reference="last")
    assert guard_factor(unguarded, p) is None


def _tiny_model():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 3)
            self.head = torch.nn.Linear(3, 2)

        def get_input_embeddings(self):
            return self.embed

    return Tiny()


@pytest.mark.parametrize("mode", ["adahessian", "adamw", "frozen"])
def test_the_word_embedding_is_trained_by_adahessian_by_adamw_or_not_at_all(mode):
    from benchmarks.lazy_trace import EMBEDDING_LR, split_embedding

    model = _tiny_model()
    kwargs, body, extra = split_embedding({"hessian_interval": 20, "embedding": mode}, model)
    assert kwargs == {"hessian_interval": 20}  # the trace's keys never reach AdaHessian
    embedding, head = model.embed.weight, list(model.head.parameters())
    in_body = any(p is embedding for p in body)
    assert in_body == (mode == "adahessian")
    assert all(any(p is q for q in body) for p in head)
    assert embedding.requires_grad == (mode != "frozen")
    if mode == "adamw":
        assert extra.param_groups[0]["params"] == [embedding] and extra.param_groups[0]["lr"] == EMBEDDING_LR
    else:
        assert extra is None


def test_the_embeddings_adamw_takes_the_settings_learning_rate():
    from benchmarks.lazy_trace import split_embedding

    _, _, extra = split_embedding({"embedding": "adamw", "embedding_lr": 3e-4}, _tiny_model())
    assert extra.param_groups[0]["lr"] == 3e-4
