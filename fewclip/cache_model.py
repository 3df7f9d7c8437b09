"""Tip-Adapter's key-value cache of few-shot image features (Zhang et al., ECCV 2022).

Keys are the few-shot training image features, values their one-hot labels; a test feature f
reads the cache through the affinity A = f K^T, and the class logits are

    logits = s f W^T + alpha * exp(-beta (1 - A)) L

(gaopengcuhk/Tip-Adapter main.py:39-42, utils.py:116-118), with W the class text features, s
= 100 and L the one-hot values. alpha and beta are chosen on validation data by a grid search
(utils.py:99-129); fewclip never searches on the test split.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SEARCH_METRICS = ("accuracy", "balanced_accuracy")


def compute_cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - A)) L: affinity (N, K), one-hot values (K, C) -> (N, C)."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


def compute_tip_logits(
    clip_logits: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Tip-Adapter logits: clip_logits (N, C) = s f W^T, affinity (N, K) = f K^T, values (K, C)
    -> clip_logits + alpha * exp(-beta (1 - affinity)) values, (N, C)."""
    return clip_logits + alpha * compute_cache_logits(affinity, values, beta)


def average_view_keys(view_features: torch.Tensor) -> torch.Tensor:
    """Cache keys from V augmented views of K images: (V, K, D) raw features -> (K, D), the mean
    over views, then unit norm (utils.py:57-60: the views are averaged before normalising)."""
    return F.normalize(view_features.float().mean(dim=0), dim=-1)


def one_hot_values(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) labels -> (K, C) float one-hot cache values (utils.py:62)."""
    return F.one_hot(labels.long(), num_classes).float()


def build_search_grid(scale: float, steps: int) -> list[float]:
    """The source's grid, [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]
    (utils.py:103-104): `steps` values from 0.1 up to just below `scale`."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def score_predictions(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """Accuracy (the source's `cls_acc`) or balanced accuracy (mean recall over the classes
    present in `labels`) of argmax(logits (N, C)) against labels (N,)."""
    if metric not in SEARCH_METRICS:
        raise ValueError(f"search metric {metric!r} is not one of {', '.join(SEARCH_METRICS)}")
    correct = (logits.argmax(dim=1) == labels).float()
    if metric == "accuracy":
        return float(correct.mean())
    return float(torch.stack([correct[labels == c].mean() for c in labels.unique()]).mean())


def search_alpha_beta(
    clip_logits: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    betas: list[float],
    alphas: list[float],
    metric: str = "accuracy",
) -> tuple[float, float, float]:
    """The (beta, alpha) of the grid with the best score on the given (validation) data ->
    (beta, alpha, score). Beta is the outer loop, alpha the inner, and only a strictly better
    score replaces the best, so ties keep the first pair (utils.py:109-125).

    clip_logits (N, C), affinity (N, K), values (K, C), labels (N,).
    """
    best = (betas[0], alphas[0], -1.0)
    for beta in betas:
        cache = compute_cache_logits(affinity, values, beta)
        for alpha in alphas:
            score = score_predictions(clip_logits + alpha * cache, labels, metric)
            if score > best[2]:
                best = (beta, alpha, score)
    return best


class CacheModel(nn.Module):
    """The cache: keys (K, D) (a Parameter when they train, Tip-Adapter-F), values (K, C) and the
    chosen alpha and beta as buffers. K is known only once the few shots are seen, so a
    checkpoint of any K loads into a fresh cache (`resize_to`)."""

    def __init__(self, dim: int, num_classes: int, alpha: float, beta: float, trainable: bool):
        super().__init__()
        self.trainable = trainable
        self.set_keys(torch.zeros(0, dim))
        self.register_buffer("values", torch.zeros(0, num_classes))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def set_keys(self, keys: torch.Tensor) -> None:
        keys = keys.detach().clone()
        if self.trainable:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)

    def fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys (K, D) and one-hot values (K, C) of the few shots."""
        device = self.values.device
        self.set_keys(keys.to(device))
        self.values = values.detach().to(device, torch.float32)

    def resize_to(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Give keys and values the shapes a checkpoint holds (before it is loaded)."""
        if f"{prefix}keys" in state:
            self.fill(state[f"{prefix}keys"], state[f"{prefix}values"])

    def forward(
        self, features: torch.Tensor, clip_logits: torch.Tensor, alpha=None, beta=None
    ) -> torch.Tensor:
        """(N, C) Tip-Adapter logits for unit-norm features (N, D) and clip_logits (N, C)."""
        affinity = features @ self.keys.to(features.dtype).t()
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        return compute_tip_logits(
            clip_logits, affinity, self.values.to(features.dtype), alpha, beta
        )
