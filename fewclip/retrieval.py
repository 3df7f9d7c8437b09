"""Image retrieval metrics (UNI / CervixFM protocol): each query image retrieves its k nearest
training images by cosine similarity of mean-centred, normalised features.

CervixFM (yehua201826/CervixFM downstream/utils/retrieval.py:41-47) subtracts the gallery mean
from the raw features, then L2-normalises (`centre_then_normalise`); `normalise_then_centre`
normalises first (they differ for features that are not unit length). Its metrics
(downstream/utils/metrics.py:141-169): Top-k = the query's class among the k nearest (our
`hit_rate@k`), MV-k = the most common class among them, ties to the nearest (Counter order).

`hit_rate@k`: share of queries with at least one same-class image among the k nearest.
`majority_vote_accuracy@k` (and balanced): the query is classified as the most frequent class
among its k nearest; ties go to the tied class whose first member ranks nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewclip.features import autocast_context
from fewclip.trainer import ImageSet, TrainerBase

NORMALISE_ORDERS = ("centre_then_normalise", "normalise_then_centre")  # EVAL.RETRIEVAL_NORMALISE


def centre_features(
    gallery: torch.Tensor, queries: torch.Tensor, order: str = "centre_then_normalise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, D), (Q, D) -> same shapes, unit rows, centred by the gallery mean.

    centre_then_normalise: x - mean(gallery), then L2 (CervixFM retrieval.py:41-47).
    normalise_then_centre: L2 first, subtract the mean of the unit gallery, L2 again.
    """
    if order not in NORMALISE_ORDERS:
        raise ValueError(
            f"EVAL.RETRIEVAL_NORMALISE {order!r} is not one of {', '.join(NORMALISE_ORDERS)}"
        )
    gallery, queries = gallery.float(), queries.float()
    if order == "normalise_then_centre":
        gallery, queries = F.normalize(gallery, dim=-1), F.normalize(queries, dim=-1)
    mean = gallery.mean(dim=0, keepdim=True)
    return F.normalize(gallery - mean, dim=-1), F.normalize(queries - mean, dim=-1)


def compute_majority_vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Most frequent label per row of (Q, k) labels ordered nearest first; ties -> nearest."""
    count, k = neighbour_labels.shape
    counts = np.zeros((count, num_classes), np.int64)
    first = np.full((count, num_classes), k, np.int64)
    rows = np.arange(count)
    for position in range(k - 1, -1, -1):  # backwards, so `first` ends at the nearest position
        counts[rows, neighbour_labels[:, position]] += 1
        first[rows, neighbour_labels[:, position]] = position
    return np.argmax(counts * (k + 1) - first, axis=1)


def compute_retrieval_metrics(
    query_features: torch.Tensor,
    query_labels: np.ndarray,
    gallery_features: torch.Tensor,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 3, 5, 10),
    order: str = "centre_then_normalise",
) -> dict[str, Any]:
    """Hit rate and majority-vote (balanced) accuracy at each k, by centred cosine similarity
    (`order`: see `centre_features`).

    query_features (Q, D), gallery_features (G, D); labels (Q,), (G,). k larger than the gallery
    is capped at G (reported as `gallery_size`).
    """
    if len(gallery_labels) == 0:
        raise ValueError("retrieval needs a non-empty gallery (training set)")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"EVAL.RETRIEVAL k values must be >= 1, got {list(ks)}")
    gallery, queries = centre_features(gallery_features, query_features, order)
    order = torch.argsort(queries @ gallery.t(), dim=1, descending=True, stable=True).numpy()
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    num_classes = int(max(gallery_labels.max(), query_labels.max(initial=0))) + 1
    metrics: dict[str, Any] = {"gallery_size": len(gallery_labels)}
    for k in ks:
        neighbours = gallery_labels[order[:, : min(k, len(gallery_labels))]]
        hits = (neighbours == query_labels[:, None]).any(axis=1)
        correct = compute_majority_vote(neighbours, num_classes) == query_labels
        recalls = [correct[query_labels == c].mean() for c in np.unique(query_labels)]
        metrics[f"hit_rate@{k}"] = float(hits.mean()) if len(hits) else None
        metrics[f"majority_vote_accuracy@{k}"] = float(correct.mean()) if len(hits) else None
        metrics[f"majority_vote_balanced_accuracy@{k}"] = (
            float(np.mean(recalls)) if recalls else None
        )
    return metrics


def extract_image_features(trainer: TrainerBase, data: ImageSet) -> torch.Tensor | None:
    """(N, D) image features of a trainer's encoder as evaluated, or None when it exposes none.

    Frozen-encoder methods give their cached features; others expose
    `compute_image_features(images) -> (B, D)` on normalised images.
    """
    if trainer.frozen_image_encoder:
        return trainer.image_features(data)
    encode = getattr(trainer, "compute_image_features", None)
    if encode is None:
        return None
    was_training = trainer.network.training
    trainer.network.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(data), trainer.cfg.EVAL.BATCH_SIZE):
            batch = trainer.input_tensor(data.images[start : start + trainer.cfg.EVAL.BATCH_SIZE])
            with autocast_context(trainer.device, trainer.cfg.PRECISION):
                outputs.append(encode(batch).float().cpu())
    trainer.network.train(was_training)
    return torch.cat(outputs)


def evaluate_retrieval(
    trainer: TrainerBase, gallery: ImageSet, queries: ImageSet, ks: Sequence[int]
) -> dict[str, Any] | None:
    """Retrieval metrics of `queries` against the training `gallery`; None without features.
    The normalisation order is the trainer's EVAL.RETRIEVAL_NORMALISE."""
    gallery_features = extract_image_features(trainer, gallery)
    if gallery_features is None or not len(queries):
        return None
    query_features = extract_image_features(trainer, queries)
    order = trainer.cfg.EVAL.get("RETRIEVAL_NORMALISE", "centre_then_normalise")
    return compute_retrieval_metrics(
        query_features, queries.labels, gallery_features, gallery.labels, ks, order
    )
