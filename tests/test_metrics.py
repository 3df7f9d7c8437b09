"""Metrics against values computed by hand on tiny arrays."""

import json
import math

import numpy as np
import pytest

from fewclip.metrics import compute_ece, compute_metrics, compute_metrics_by_center

CLASS_NAMES = ["normal", "lsil", "hsil"]
# 3 classes, 6 samples. Arg-max predictions: [0, 1, 1, 1, 2, 0]
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],  # true 0, pred 0, confidence 0.7, correct
        [0.3, 0.6, 0.1],  # true 0, pred 1, confidence 0.6, wrong
        [0.1, 0.8, 0.1],  # true 1, pred 1, confidence 0.8, correct
        [0.2, 0.5, 0.3],  # true 1, pred 1, confidence 0.5, correct
        [0.1, 0.1, 0.8],  # true 2, pred 2, confidence 0.8, correct
        [0.4, 0.3, 0.3],  # true 2, pred 0, confidence 0.4, wrong
    ]
)


def test_multiclass_metrics_match_hand_computation():
    metrics = compute_metrics(PROBABILITIES, LABELS, CLASS_NAMES, ece_bins=3)
    # Confusion (rows true): [[1,1,0],[0,2,0],[1,0,1]]; 4 of 6 correct.
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: 1/2, 2/2, 1/2 -> balanced accuracy = mean = 2/3.
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_recall"] == pytest.approx(2 / 3)
    # Precision per class (columns): 1/2, 2/3, 1/1 -> macro 13/18.
    assert metrics["macro_precision"] == pytest.approx(13 / 18)
    # F1 per class: 1/2, 4/5, 2/3 -> macro 59/90.
    assert metrics["macro_f1"] == pytest.approx(59 / 90)
    # Kappa: p_o = 2/3; row sums 2,2,2, column sums 2,3,1 -> p_e = 12/36; (1/3)/(2/3) = 1/2.
    assert metrics["kappa"] == pytest.approx(0.5)
    # MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = 12 / sqrt(22*24).
    assert metrics["mcc"] == pytest.approx(12 / math.sqrt(22 * 24))
    # One-vs-rest AUROC by pair counting: class 0: 7/8, class 1: 7/8, class 2: 7.5/8 (one tie).
    assert metrics["auroc"] == pytest.approx((7 / 8 + 7 / 8 + 7.5 / 8) / 3)
    # NLL: probabilities of the true class are 0.7, 0.3, 0.8, 0.5, 0.8, 0.3.
    expected_nll = -np.mean(np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.3]))
    assert metrics["nll"] == pytest.approx(expected_nll)
    # 3 bins: (1/3, 2/3] holds 0.6, 0.5, 0.4 (acc 1/3, conf 0.5); (2/3, 1] holds 0.7, 0.8, 0.8
    # (acc 1, conf 23/30). ECE = 0.5 * 1/6 + 0.5 * 7/30 = 0.2.
    assert metrics["ece"] == pytest.approx(0.2)
    reliability = metrics["reliability"]
    assert reliability["bin_count"] == [0, 3, 3]
    assert reliability["bin_confidence"][0] is None and reliability["bin_accuracy"][0] is None
    assert reliability["bin_confidence"][1:] == pytest.approx([0.5, 23 / 30])
    assert reliability["bin_accuracy"][1:] == pytest.approx([1 / 3, 1.0])
    assert metrics["per_class"]["lsil"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert metrics["num_samples"] == 6
    assert "binary" not in metrics
    json.dumps(metrics, allow_nan=False)


def test_ece_hand_examples():
    # 10 bins, one sample per bin: gaps 0.05, 0.85, 0.45, 0.15 -> mean 0.375.
    assert compute_ece(np.array([0.95, 0.85, 0.55, 0.15]), np.array([1, 0, 1, 0]), 10) == (
        pytest.approx(0.375)
    )
    # Both in bin (0.9, 1]: confidence 0.95, accuracy 0.5 -> 0.45.
    assert compute_ece(np.array([0.91, 0.99]), np.array([True, False]), 10) == pytest.approx(0.45)
    # Perfectly calibrated: confidence 0.75, 3 of 4 correct.
    assert compute_ece(np.full(4, 0.75), np.array([1, 1, 1, 0]), 15) == pytest.approx(0.0)
    # Bins are (lower, upper]: 0.5 falls in the first of 2 bins, 1.0 in the last.
    assert compute_ece(np.array([0.5, 1.0]), np.array([0, 1]), 2) == pytest.approx(0.25)


BINARY_NAMES = ["normal", "benign", "hsil", "cancer"]
BINARY_LABELS = np.array([0, 1, 2, 3, 0, 2, 3])
BINARY_PROBABILITIES = np.array(
    [
        [0.6, 0.2, 0.1, 0.1],  # negative, pred normal -> TN, score 0.2
        [0.2, 0.3, 0.4, 0.1],  # negative, pred hsil   -> FP, score 0.5
        [0.1, 0.1, 0.7, 0.1],  # positive, pred hsil   -> TP, score 0.8
        [0.1, 0.1, 0.1, 0.7],  # positive, pred cancer -> TP, score 0.8
        [0.7, 0.1, 0.1, 0.1],  # negative, pred normal -> TN, score 0.2
        [0.3, 0.4, 0.2, 0.1],  # positive, pred benign -> FN, score 0.3
        [0.05, 0.05, 0.1, 0.8],  # positive, pred cancer -> TP, score 0.9
    ]
)


def test_binary_view_by_name():
    metrics = compute_metrics(
        BINARY_PROBABILITIES, BINARY_LABELS, BINARY_NAMES, positive_classes=["hsil", "cancer"]
    )
    binary = metrics["binary"]
    # TP=3, FP=1, TN=2, FN=1.
    assert (binary["true_positives"], binary["false_positives"]) == (3, 1)
    assert (binary["true_negatives"], binary["false_negatives"]) == (2, 1)
    assert binary["sensitivity"] == pytest.approx(3 / 4)
    assert binary["specificity"] == pytest.approx(2 / 3)
    assert binary["ppv"] == pytest.approx(3 / 4)
    assert binary["npv"] == pytest.approx(2 / 3)
    assert binary["accuracy"] == pytest.approx(5 / 7)
    # Positive scores 0.8, 0.8, 0.3, 0.9 vs negatives 0.2, 0.5, 0.2: 11 of 12 pairs ordered.
    assert binary["auroc"] == pytest.approx(11 / 12)
    assert binary["positive_classes"] == ["hsil", "cancer"]


def test_binary_view_ignores_class_order():
    reference = compute_metrics(
        BINARY_PROBABILITIES, BINARY_LABELS, BINARY_NAMES, positive_classes=["hsil", "cancer"]
    )
    order = [3, 0, 2, 1]  # new column j holds old class order[j]
    permuted_names = [BINARY_NAMES[old] for old in order]
    new_label = {old: new for new, old in enumerate(order)}
    permuted_labels = np.array([new_label[label] for label in BINARY_LABELS])
    permuted = compute_metrics(
        BINARY_PROBABILITIES[:, order],
        permuted_labels,
        permuted_names,
        positive_classes=["hsil", "cancer"],
    )
    assert permuted["binary"].pop("positive_classes") == ["hsil", "cancer"]
    reference["binary"].pop("positive_classes")
    assert permuted["binary"] == pytest.approx(reference["binary"])
    for name in BINARY_NAMES:
        assert permuted["per_class"][name] == pytest.approx(reference["per_class"][name])
    assert permuted["accuracy"] == pytest.approx(reference["accuracy"])
    assert permuted["auroc"] == pytest.approx(reference["auroc"])


def test_undefined_values_are_none():
    # Every label and prediction is class 0: AUROC, kappa, MCC undefined; no positives at all.
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    metrics = compute_metrics(probabilities, np.zeros(3, int), ["normal", "tumor"], ["tumor"])
    assert metrics["auroc"] is None
    assert metrics["kappa"] is None
    assert metrics["mcc"] is None
    assert metrics["accuracy"] == 1.0
    binary = metrics["binary"]
    assert binary["auroc"] is None
    assert binary["sensitivity"] is None  # no true positives or false negatives
    assert binary["ppv"] is None  # nothing predicted positive
    assert binary["specificity"] == 1.0 and binary["npv"] == 1.0
    assert metrics["per_class"]["tumor"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    json.dumps(metrics, allow_nan=False)


def test_binary_two_class_auroc_uses_second_column():
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # Positives 0.7, 0.4 vs negatives 0.2, 0.55: pairs (0.7>0.2, 0.7>0.55, 0.4>0.2) = 3/4.
    assert compute_metrics(probabilities, labels, ["a", "b"])["auroc"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("probabilities", "labels", "names", "positives", "message"),
    [
        (PROBABILITIES, LABELS[:5], CLASS_NAMES, (), "6 rows but labels have 5"),
        (np.zeros((0, 3)), np.zeros(0, int), CLASS_NAMES, (), "0 samples"),
        (PROBABILITIES, np.array([0, 0, 1, 1, 2, 3]), CLASS_NAMES, (), "label 3 out of range"),
        (PROBABILITIES, LABELS, CLASS_NAMES[:2], (), "3 columns but 2 class names"),
        (PROBABILITIES * 2, LABELS, CLASS_NAMES, (), "row 0 sums to 2"),
        (PROBABILITIES[0], LABELS, CLASS_NAMES, (), "must be 2-D"),
        (PROBABILITIES, LABELS + 0.5, CLASS_NAMES, (), "labels must be integers"),
        (PROBABILITIES, LABELS, CLASS_NAMES, ["cancer"], "unknown positive class 'cancer'"),
    ],
)
def test_bad_input_raises_clear_message(probabilities, labels, names, positives, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(probabilities, labels, names, positive_classes=positives)


def test_unknown_positive_class_lists_class_names():
    with pytest.raises(ValueError, match=r"class names are \['normal', 'lsil', 'hsil'\]"):
        compute_metrics(PROBABILITIES, LABELS, CLASS_NAMES, positive_classes=["HSIL"])


def test_metrics_by_center():
    centers = ["site_b", "site_a", "site_b", "site_a", "site_b", "site_a"]
    by_center = compute_metrics_by_center(PROBABILITIES, LABELS, centers, CLASS_NAMES, ["hsil"])
    assert list(by_center) == ["site_a", "site_b"]
    # site_a holds rows 1, 3, 5: labels [0, 1, 2], predictions [1, 1, 0] -> 1 of 3 correct.
    site_a = by_center["site_a"]
    assert site_a["num_samples"] == 3
    assert site_a["accuracy"] == pytest.approx(1 / 3)
    assert site_a["confusion_matrix"] == [[0, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert site_a["binary"]["sensitivity"] == 0.0  # the hsil sample was predicted normal
    # site_b holds rows 0, 2, 4: all correct.
    assert by_center["site_b"]["accuracy"] == 1.0
    expected = compute_metrics(PROBABILITIES[[0, 2, 4]], LABELS[[0, 2, 4]], CLASS_NAMES, ["hsil"])
    assert by_center["site_b"] == expected
    with pytest.raises(ValueError, match="centers have 2 entries but labels have 6"):
        compute_metrics_by_center(PROBABILITIES, LABELS, ["a", "b"], CLASS_NAMES)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("case", range(12))
def test_metrics_equal_scikit_learn(case):
    """The numpy formulas give scikit-learn's values: random sizes, tied scores (rounded
    probabilities), classes absent from the labels and never predicted, 2 and 5 classes."""
    from sklearn import metrics as reference

    generator = np.random.default_rng(case)
    num_classes = 2 if case % 3 == 0 else 5
    size = int(generator.integers(4, 60))
    logits = generator.normal(size=(size, num_classes)) * (1 + case % 4)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if case % 2:
        probabilities = np.round(probabilities, 1) + 1e-9  # many ties
        probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = generator.integers(0, num_classes - (case % 4 == 1), size=size)  # maybe one absent
    labels[:2] = [0, 1]
    names = [f"class{c}" for c in range(num_classes)]
    metrics = compute_metrics(probabilities, labels, names, positive_classes=["class1"])
    predictions, class_ids = probabilities.argmax(axis=1), list(range(num_classes))
    precision, recall, f1, support = reference.precision_recall_fscore_support(
        labels, predictions, labels=class_ids, zero_division=0
    )
    present = np.unique(labels)
    if num_classes == 2:
        auroc = reference.roc_auc_score(labels, probabilities[:, 1])
    else:
        auroc = np.mean(
            [reference.roc_auc_score(labels == c, probabilities[:, c]) for c in present]
        )
    expected = {
        "balanced_accuracy": reference.balanced_accuracy_score(labels, predictions),
        "macro_precision": np.mean(precision),
        "macro_recall": np.mean(recall),
        "macro_f1": np.mean(f1),
        "auroc": auroc,
        "kappa": reference.cohen_kappa_score(labels, predictions, labels=class_ids),
        "mcc": reference.matthews_corrcoef(labels, predictions),
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert (
        metrics["confusion_matrix"]
        == reference.confusion_matrix(labels, predictions, labels=class_ids).tolist()
    )
    for c, name in enumerate(names):
        assert [metrics["per_class"][name][key] for key in ("precision", "recall", "f1")] == (
            pytest.approx([precision[c], recall[c], f1[c]], abs=1e-12)
        )
    truth = labels == 1
    assert metrics["binary"]["auroc"] == pytest.approx(
        reference.roc_auc_score(truth, probabilities[:, 1]), abs=1e-12
    )
