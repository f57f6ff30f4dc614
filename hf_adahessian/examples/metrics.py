"""GLUE and BLEU metrics that work offline.

``evaluate.load("glue")`` fetches its script from the Hub, which these machines
cannot reach; the definitions below are the ones that script uses (scikit-learn
and scipy for GLUE, sacreBLEU's defaults for BLEU), with the same result keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import sacrebleu
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


@dataclass(frozen=True)
class GlueTask:
    """What a script needs to know about one GLUE task."""

    sentence1_key: str
    sentence2_key: str | None
    is_regression: bool
    label_names: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, str | None]:
        """The text columns, as HF run_glue's ``task_to_keys``."""
        return (self.sentence1_key, self.sentence2_key)

    @property
    def num_labels(self) -> int:
        """1 for regression (STS-B), else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)


_NLI2 = ("entailment", "not_entailment")

# Label names in the order of the `datasets` glue configs, so label ids match.
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, False, ("unacceptable", "acceptable")),
    "mnli": GlueTask("premise", "hypothesis", False, ("entailment", "neutral", "contradiction")),
    "mrpc": GlueTask("sentence1", "sentence2", False, ("not_equivalent", "equivalent")),
    "qnli": GlueTask("question", "sentence", False, _NLI2),
    "qqp": GlueTask("question1", "question2", False, ("not_duplicate", "duplicate")),
    "rte": GlueTask("sentence1", "sentence2", False, _NLI2),
    "sst2": GlueTask("sentence", None, False, ("negative", "positive")),
    "stsb": GlueTask("sentence1", "sentence2", True, ()),
    # WNLI's order is the reverse of RTE/QNLI's in the glue configs.
    "wnli": GlueTask("sentence1", "sentence2", False, ("not_entailment", "entailment")),
}

# The metric also accepts the evaluation-only names that evaluate's "glue" accepts.
_ACCURACY_ONLY = {"sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"}
GLUE_METRIC_NAMES: tuple[str, ...] = tuple(sorted(_ACCURACY_ONLY | {"cola", "stsb", "mrpc", "qqp"}))


def glue_metrics(task_name: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Score GLUE predictions exactly as evaluate's "glue" metric does.

    Args:
        task_name: a GLUE task ("cola", "sst2", ...), or "mnli_matched",
            "mnli_mismatched", "hans".
        predictions: class ids (floats for "stsb"), one per example.
        references: gold labels, same length.

    Returns:
        cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"};
        mrpc, qqp: {"accuracy", "f1"}; every other task: {"accuracy"}.
        Values are plain Python floats.
    """
    if task_name not in GLUE_METRIC_NAMES:
        raise ValueError(f"unknown GLUE task {task_name!r}; valid names: {', '.join(GLUE_METRIC_NAMES)}")
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape or preds.ndim != 1:
        raise ValueError(
            f"predictions and references must be 1-D and of equal length, got shapes {preds.shape} and {refs.shape}"
        )
    if len(preds) == 0:
        raise ValueError("no predictions to score")

    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    if task_name == "stsb":
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}
    accuracy = float((preds == refs).mean())
    if task_name in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": float(f1_score(y_true=refs, y_pred=preds))}
    return {"accuracy": accuracy}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU with sacreBLEU's default settings (13a tokenizer, "exp" smoothing, case-sensitive).

    Args:
        predictions: one detokenized hypothesis per example.
        references: for each prediction, the list of its references (evaluate's
            layout); every prediction must have the same number of references.
            A plain list of strings is read as one reference per prediction.

    Returns:
        {"bleu": score (0-100), "counts", "totals", "precisions", "bp", "sys_len",
        "ref_len"}, as evaluate's "sacrebleu" metric but with "bleu" for "score".
    """
    if isinstance(predictions, str):
        raise ValueError("predictions must be a list of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    per_prediction = {len(refs) for refs in references}
    if len(per_prediction) != 1:
        raise ValueError("sacreBLEU needs the same number of references for every prediction")
    # sacreBLEU wants one stream per reference set, not one list per prediction.
    streams = [list(stream) for stream in zip(*references)]
    result = sacrebleu.corpus_bleu(list(predictions), streams)
    return {
        "bleu": float(result.score),
        "counts": list(result.counts),
        "totals": list(result.totals),
        "precisions": [float(p) for p in result.precisions],
        "bp": float(result.bp),
        "sys_len": int(result.sys_len),
        "ref_len": int(result.ref_len),
    }


class OfflineMetric:
    """What ``evaluate.load(name).compute(predictions=..., references=...)`` returns, computed here."""

    def __init__(self, name: str, compute):
        self.name, self._compute = name, compute

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict:
        return self._compute(predictions, references)

    def __repr__(self) -> str:
        return f"OfflineMetric({self.name!r})"


def offline_metric(path: str, config_name: str | None = None) -> OfflineMetric | None:
    """The offline stand-in for ``evaluate.load(path, config_name)``, or None where there is none.

    ``"accuracy"``; ``"glue"`` with a GLUE task as config; ``"sacrebleu"``, whose
    result keeps evaluate's key ``"score"`` beside ``"bleu"``.
    """
    name = str(path).rstrip("/").split("/")[-1].removesuffix(".py")
    if name == "accuracy":
        return OfflineMetric("accuracy", lambda p, r: {
            "accuracy": float((np.asarray(p) == np.asarray(r)).mean())})
    if name == "glue" and config_name in GLUE_METRIC_NAMES:
        return OfflineMetric(f"glue/{config_name}", lambda p, r: glue_metrics(config_name, p, r))
    if name == "sacrebleu":
        def compute(p, r):
            result = bleu(p, r)
            return {"score": result["bleu"], **result}
        return OfflineMetric("sacrebleu", compute)
    return None
