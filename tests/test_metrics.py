"""hf_adahessian.examples.metrics: GLUE and BLEU, offline, with the official definitions.

Each metric is checked against a direct computation with the library the
official metric uses (scikit-learn, scipy, sacreBLEU) and against values
worked out by hand.
"""

import math

import numpy as np
import pytest
import sacrebleu
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from hf_adahessian.examples.metrics import GLUE_TASKS, bleu, glue_metrics


# --------------------------------------------------------------------------- GLUE_TASKS

# HF run_glue's task_to_keys.
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def test_glue_tasks_are_the_nine_glue_tasks():
    assert set(GLUE_TASKS) == set(TASK_TO_KEYS)


@pytest.mark.parametrize("task", sorted(TASK_TO_KEYS))
def test_sentence_keys_match_run_glue(task):
    assert GLUE_TASKS[task].keys == TASK_TO_KEYS[task]
    assert (GLUE_TASKS[task].sentence1_key, GLUE_TASKS[task].sentence2_key) == TASK_TO_KEYS[task]


def test_only_stsb_is_regression_with_one_output():
    assert [t for t, meta in GLUE_TASKS.items() if meta.is_regression] == ["stsb"]
    assert GLUE_TASKS["stsb"].num_labels == 1


@pytest.mark.parametrize(
    "task, names",
    [
        ("cola", ("unacceptable", "acceptable")),
        ("mnli", ("entailment", "neutral", "contradiction")),
        ("mrpc", ("not_equivalent", "equivalent")),
        ("qnli", ("entailment", "not_entailment")),
        ("qqp", ("not_duplicate", "duplicate")),
        ("rte", ("entailment", "not_entailment")),
        ("sst2", ("negative", "positive")),
        ("wnli", ("not_entailment", "entailment")),
    ],
)
def test_label_names_in_the_order_of_the_datasets_glue_configs(task, names):
    assert tuple(GLUE_TASKS[task].label_names) == names
    assert GLUE_TASKS[task].num_labels == len(names)


# --------------------------------------------------------------------------- glue_metrics

PREDS = [1, 0, 1, 1, 0, 1, 0, 0]
REFS = [1, 0, 0, 1, 0, 1, 1, 0]


@pytest.mark.parametrize(
    "task, keys",
    [
        ("cola", {"matthews_correlation"}),
        ("stsb", {"pearson", "spearmanr"}),
        ("mrpc", {"accuracy", "f1"}),
        ("qqp", {"accuracy", "f1"}),
        *[
            (t, {"accuracy"})
            for t in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
        ],
    ],
)
def test_result_keys_are_those_of_evaluate_glue(task, keys):
    result = glue_metrics(task, PREDS, REFS)
    assert set(result) == keys
    assert all(type(v) is float for v in result.values())


def test_accuracy_and_f1_worked_by_hand():
    # tp=2, fp=1, fn=0, tn=1: accuracy 3/4, precision 2/3, recall 1, F1 0.8.
    result = glue_metrics("mrpc", [1, 0, 1, 1], [1, 0, 0, 1])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx(0.8)


def test_matthews_worked_by_hand():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2*1 - 1*0) / sqrt(3*2*2*1)
    result = glue_metrics("cola", [1, 0, 1, 1], [1, 0, 0, 1])
    assert result["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))


def test_perfect_predictions_score_one():
    assert glue_metrics("sst2", REFS, REFS) == {"accuracy": 1.0}
    assert glue_metrics("qqp", REFS, REFS) == {"accuracy": 1.0, "f1": 1.0}
    assert glue_metrics("cola", REFS, REFS) == {"matthews_correlation": 1.0}
    scores = [0.5, 1.0, 2.5, 3.0, 4.8]
    assert glue_metrics("stsb", scores, scores) == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})


def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    preds, refs = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert glue_metrics("cola", preds, refs)["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds))
    mrpc = glue_metrics("mrpc", preds, refs)
    assert mrpc["accuracy"] == pytest.approx(np.mean(preds == refs))
    assert mrpc["f1"] == pytest.approx(f1_score(refs, preds))
    three_way_preds, three_way_refs = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    mnli = glue_metrics("mnli", three_way_preds, three_way_refs)
    assert mnli["accuracy"] == pytest.approx(np.mean(three_way_preds == three_way_refs))


def test_stsb_matches_scipy():
    rng = np.random.default_rng(1)
    refs = rng.uniform(0, 5, 40)
    preds = refs + rng.normal(0, 1, 40)
    result = glue_metrics("stsb", preds, refs)
    assert result["pearson"] == pytest.approx(pearsonr(preds, refs)[0])
    assert result["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0])


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown GLUE task 'imdb'.*cola.*sst2"):
        glue_metrics("imdb", [0], [0])


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="equal length"):
        glue_metrics("sst2", [0, 1], [0])


# --------------------------------------------------------------------------- bleu

BLEU_KEYS = {"bleu", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"}


def test_perfect_translation_scores_100():
    result = bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert set(result) == BLEU_KEYS
    assert result["bleu"] == pytest.approx(100.0)
    assert result["bp"] == 1.0


def test_bleu_worked_by_hand():
    # Clipped matches 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty:
    # BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** (1/4).
    result = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert result["counts"] == [5, 3, 2, 1]
    assert result["totals"] == [6, 5, 4, 3]
    assert result["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25)


def test_bleu_matches_sacrebleu_with_references_transposed():
    predictions = ["A man is riding a bike.", "Two dogs run on grass .", "A child eats."]
    references = [  # two references per prediction, evaluate's layout
        ["A man rides a bicycle.", "A man is riding a bike down the road."],
        ["Two dogs are running on the grass.", "Dogs run on grass."],
        ["A kid is eating.", "A child eats food."],
    ]
    expected = sacrebleu.corpus_bleu(predictions, [[r[0] for r in references], [r[1] for r in references]])
    result = bleu(predictions, references)
    assert result["bleu"] == pytest.approx(expected.score)
    assert result["counts"] == list(expected.counts)
    assert result["totals"] == list(expected.totals)
    assert result["precisions"] == pytest.approx(expected.precisions)
    assert result["bp"] == pytest.approx(expected.bp)
    assert (result["sys_len"], result["ref_len"]) == (expected.sys_len, expected.ref_len)


def test_one_string_per_prediction_is_one_reference_each():
    predictions = ["A man is riding a bike.", "A child eats."]
    assert bleu(predictions, ["A man rides a bike.", "A kid eats."]) == bleu(
        predictions, [["A man rides a bike."], ["A kid eats."]]
    )


def test_brevity_penalty_for_short_output():
    result = bleu(["a b c"], [["a b c d e f"]])
    assert result["bp"] == pytest.approx(math.exp(1 - 6 / 3))


def test_bleu_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="same number of references"):
        bleu(["a", "b"], [["a"], ["b", "c"]])
