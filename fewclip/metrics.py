"""Classification metrics for few-shot evaluation, returned as plain JSON-ready numbers.

Every value is a Python ``float``/``int``/``None`` or a list/dict of them; a metric that is
undefined on the given data (one class only, no predicted positives, ...) is ``None``, never NaN.
Predictions are the arg-max class of each probability row (ties go to the lowest index).

The formulas are written here in numpy, from the confusion matrix and mid-ranks, rather than
imported from scikit-learn: importing sklearn.metrics (and the scipy.stats it pulls in) cost a
one-run command 0.7-2 s. tests/test_metrics.py checks every value against scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ROW_SUM_TOLERANCE = 1e-3
NLL_EPSILON = 1e-12


def compute_reliability(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin predictions by confidence into ``num_bins`` equal-width bins over [0, 1].

    confidences: (N,) max class probability; correct: (N,) bool, prediction == label.
    Bin b covers (b/num_bins, (b+1)/num_bins]; bin 0 also takes confidence 0.
    Returns (mean confidence, accuracy, count), each (num_bins,); empty bins hold NaN means.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    interior_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    bins = np.searchsorted(interior_edges, confidences, side="left")
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidences, minlength=num_bins) / counts
        accuracy = np.bincount(bins, correct, minlength=num_bins) / counts
    return mean_confidence, accuracy, counts


def compute_ece(confidences: np.ndarray, correct: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017, eq. 3).

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over equal-width confidence bins.
    confidences: (N,) max class probability; correct: (N,) bool.
    """
    mean_confidence, accuracy, counts = compute_reliability(confidences, correct, num_bins)
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - mean_confidence[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def _number(value: float | None) -> float | None:
    """A finite Python float, or None for undefined (None/NaN/inf) values."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _validate(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], ece_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be 2-D (N, C), got shape {probabilities.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    num_samples, num_classes = probabilities.shape
    if labels.shape[0] != num_samples:
        raise ValueError(f"probabilities have {num_samples} rows but labels have {len(labels)}")
    if num_samples == 0:
        raise ValueError("cannot compute metrics on 0 samples")
    if len(class_names) != num_classes:
        raise ValueError(
            f"probabilities have {num_classes} columns but {len(class_names)} class names given"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    if labels.dtype.kind not in "iu" and not (
        labels.dtype.kind == "f" and np.all(labels == np.round(labels))
    ):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} out of range for {num_classes} classes")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("probabilities contain NaN or inf")
    if np.any(probabilities < -ROW_SUM_TOLERANCE):
        raise ValueError(f"probabilities contain negative values (min {probabilities.min():g})")
    row_error = np.abs(probabilities.sum(axis=1) - 1.0)
    if np.any(row_error > ROW_SUM_TOLERANCE):
        row = int(np.flatnonzero(row_error > ROW_SUM_TOLERANCE)[0])
        raise ValueError(
            f"probability row {row} sums to {probabilities[row].sum():.6g}, expected 1 "
            f"(pass softmax outputs, not logits)"
        )
    if not isinstance(ece_bins, (int, np.integer)) or ece_bins < 1:
        raise ValueError(f"ece_bins must be a positive integer, got {ece_bins!r}")
    return probabilities, labels


def _confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0 where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (0 where undefined) and support of every class, from the matrix.

    F1 = 2 TP / (2 TP + FP + FN), which equals 2PR / (P + R) wherever both are defined.
    """
    true_positives = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    return precision, recall, _safe_divide(2 * true_positives, predicted + support), support


def _kappa(matrix: np.ndarray) -> float | None:
    """Cohen's kappa (1960): (p_o - p_e) / (1 - p_e) from the matrix; None if p_e = 1."""
    total = matrix.sum()
    expected = np.outer(matrix.sum(axis=1), matrix.sum(axis=0)) / total
    off_diagonal = ~np.eye(len(matrix), dtype=bool)
    disagreement_expected = expected[off_diagonal].sum()
    if disagreement_expected == 0:
        return None
    return float(1.0 - matrix[off_diagonal].sum() / disagreement_expected)


def _binary_auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of a score for boolean truth (both sides present).

    The Mann-Whitney statistic with mid-ranks for tied scores, (R+ - n+(n+ + 1)/2) / (n+ n-),
    which is the trapezoidal area under the empirical ROC curve (Hanley & McNeil 1982).
    """
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mid_ranks[inverse]
    positives = int(truth.sum())
    negatives = len(truth) - positives
    return float((ranks[truth].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def _auroc_one_vs_rest(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC over the classes present in labels; None if fewer than 2."""
    present = np.unique(labels)
    if present.size < 2:
        return None
    if probabilities.shape[1] == 2:
        return _binary_auroc(labels == 1, probabilities[:, 1])
    return float(np.mean([_binary_auroc(labels == c, probabilities[:, c]) for c in present]))


def _mcc(matrix: np.ndarray) -> float | None:
    """Multiclass Matthews correlation (Gorodkin 2004) from a confusion matrix; None if 0/0."""
    total, correct = matrix.sum(), np.trace(matrix)
    predicted, true = matrix.sum(axis=0), matrix.sum(axis=1)
    numerator = correct * total - np.dot(predicted, true)
    denominator = math.sqrt(
        float(total**2 - np.dot(predicted, predicted)) * float(total**2 - np.dot(true, true))
    )
    return float(numerator / denominator) if denominator > 0 else None


def _binary_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    positive_classes: Sequence[str],
) -> dict:
    names = list(class_names)
    if isinstance(positive_classes, str):
        positive_classes = [positive_classes]
    unknown = [name for name in positive_classes if name not in names]
    if unknown:
        raise ValueError(f"unknown positive class {unknown[0]!r}; class names are {names}")
    positive_names = list(dict.fromkeys(positive_classes))
    positive_ids = [names.index(name) for name in positive_names]
    score = probabilities[:, positive_ids].sum(axis=1)
    truth = np.isin(labels, positive_ids)
    predicted = np.isin(predictions, positive_ids)
    tp, fp = int(np.sum(truth & predicted)), int(np.sum(~truth & predicted))
    tn, fn = int(np.sum(~truth & ~predicted)), int(np.sum(truth & ~predicted))
    both_sides = truth.any() and not truth.all()
    return {
        "positive_classes": positive_names,
        "auroc": _binary_auroc(truth, score) if both_sides else None,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": (tp + tn) / len(labels),
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
    }


def compute_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    positive_classes: Sequence[str] = (),
    ece_bins: int = 15,
) -> dict:
    """All evaluation metrics for one test set.

    probabilities: (N, C) class probabilities, rows summing to 1 (within 1e-3).
    labels: (N,) integer class ids in [0, C). class_names: C unique names, column order.
    positive_classes: names (never ids) for the binary view; empty -> no "binary" key.
    Macro precision/recall/F1 average over all C classes (absent classes count as 0);
    balanced_accuracy and auroc average over the classes present in labels.
    Raises ValueError with a one-line message on malformed input.
    """
    probabilities, labels = _validate(probabilities, labels, class_names, ece_bins)
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    confidences = probabilities.max(axis=1)
    correct = predictions == labels
    matrix = _confusion(labels, predictions, num_classes)
    precision, recall, f1, support = _per_class(matrix)
    bin_confidence, bin_accuracy, bin_count = compute_reliability(confidences, correct, ece_bins)
    true_probability = np.clip(probabilities[np.arange(len(labels)), labels], NLL_EPSILON, 1.0)
    metrics = {
        "accuracy": float(np.mean(correct)),
        "balanced_accuracy": float(np.mean(recall[support > 0])),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "auroc": _auroc_one_vs_rest(probabilities, labels),
        "kappa": _kappa(matrix),
        "mcc": _mcc(matrix),
        "ece": compute_ece(confidences, correct, ece_bins),
        "nll": float(-np.mean(np.log(true_probability))),
        "num_samples": len(labels),
        "confusion_matrix": matrix.astype(int).tolist(),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(class_names)
        },
        "reliability": {
            "bin_confidence": [_number(value) for value in bin_confidence],
            "bin_accuracy": [_number(value) for value in bin_accuracy],
            "bin_count": [int(count) for count in bin_count],
        },
    }
    if positive_classes:
        metrics["binary"] = _binary_metrics(
            probabilities, labels, predictions, class_names, positive_classes
        )
    return metrics


def compute_metrics_by_center(
    probabilities: np.ndarray,
    labels: np.ndarray,
    centers: Sequence[str],
    class_names: Sequence[str],
    positive_classes: Sequence[str] = (),
    ece_bins: int = 15,
) -> dict[str, dict]:
    """compute_metrics on each center's rows; centers: (N,) names. Keys sorted by center name."""
    probabilities, labels = _validate(probabilities, labels, class_names, ece_bins)
    centers = np.asarray([str(center) for center in centers])
    if centers.shape[0] != labels.shape[0]:
        raise ValueError(f"centers have {len(centers)} entries but labels have {len(labels)}")
    return {
        str(center): compute_metrics(
            probabilities[centers == center],
            labels[centers == center],
            class_names,
            positive_classes,
            ece_bins,
        )
        for center in sorted(set(centers.tolist()))
    }
