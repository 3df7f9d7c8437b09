"""Evaluation of a trained method on the in-domain test split and every target center."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fewclip.metrics import compute_metrics, compute_metrics_by_center
from fewclip.retrieval import evaluate_retrieval
from fewclip.trainer import ImageSet, TrainerBase


def evaluate_set(
    trainer: TrainerBase,
    data: ImageSet,
    positive_classes: list[str],
    ece_bins: int,
    gallery: ImageSet | None = None,
    retrieval_ks: Sequence[int] = (),
) -> dict[str, Any]:
    """Overall metrics plus the same metrics per center of `data`; with `retrieval_ks` and a
    `gallery` (the training images) also retrieval metrics when the trainer exposes features."""
    probabilities = trainer.predict_probabilities(data)
    metrics = compute_metrics(
        probabilities, data.labels, trainer.class_names, positive_classes, ece_bins
    )
    if len(set(data.centers)) > 1:
        metrics["per_center"] = compute_metrics_by_center(
            probabilities,
            data.labels,
            data.centers,
            trainer.class_names,
            positive_classes,
            ece_bins,
        )
    if retrieval_ks and gallery is not None:
        retrieval = evaluate_retrieval(trainer, gallery, data, retrieval_ks)
        if retrieval is not None:
            metrics["retrieval"] = retrieval
    return metrics


def summarise_targets(targets: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Mean and worst center for each headline metric across target centers."""
    summary: dict[str, Any] = {}
    for key in keys:
        values = {center: m[key] for center, m in targets.items() if m.get(key) is not None}
        if values:
            worst = min(values, key=values.get)
            summary[key] = {
                "mean": float(np.mean(list(values.values()))),
                "worst": values[worst],
                "worst_center": worst,
            }
    return summary


def validation_score(trainer: TrainerBase, data: ImageSet) -> float:
    """Balanced accuracy on validation data: the selection criterion (never the test set)."""
    probabilities = trainer.predict_probabilities(data)
    predicted = probabilities.argmax(axis=1)
    per_class = [np.mean(predicted[data.labels == c] == c) for c in np.unique(data.labels)]
    return float(np.mean(per_class))
