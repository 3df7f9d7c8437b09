"""Batch samplers over the few-shot training set, registered so a config string picks one.

A sampler yields the indices of one epoch at a time from an explicit `torch.Generator`; it may
learn from the last epoch's per-sample probabilities of the true class (`update`).
"""

from __future__ import annotations

import numpy as np
import torch
from yacs.config import CfgNode

from fewclip.registry import SAMPLERS


class SamplerBase:
    """Uniform by default: a random permutation per epoch, epoch length = training set size."""

    def __init__(self, labels: np.ndarray, generator: torch.Generator, cfg: CfgNode | None) -> None:
        self.labels = np.asarray(labels)
        self.generator = generator
        self.cfg = cfg

    def epoch_indices(self) -> np.ndarray:
        return torch.randperm(len(self.labels), generator=self.generator).numpy()

    def update(self, indices: np.ndarray, true_class_probabilities: np.ndarray) -> None:
        """Called after each step with the batch's indices and p(true class); default ignores it."""

    def state(self) -> dict:
        """Numbers worth reporting in results.json (e.g. current class weights)."""
        return {}


@SAMPLERS.register("uniform")
class UniformSampler(SamplerBase):
    """Each image once per epoch in random order."""


# ----- class-balanced resampling (AMLPF-CLIP) ---------------------------------------------------
DIFFICULTY_DEFAULTS = {"GAMMA": 2.0, "SMOOTHING": 0.1, "FLOOR": 0.01}  # when a node lacks them


def add_sampler_keys(node: CfgNode, sampler: str = "uniform") -> CfgNode:
    """Add SAMPLER and the difficulty sampler's keys to a trainer's config node."""
    gamma, smoothing, floor = DIFFICULTY_DEFAULTS.values()
    node.SAMPLER = sampler  # registered sampler: uniform, inverse_frequency, difficulty
    node.DIFFICULTY_GAMMA = gamma  # gamma of the class difficulty mean (1 - p_true)^gamma
    node.DIFFICULTY_SMOOTHING = smoothing  # share of the class draw kept uniform over classes
    node.DIFFICULTY_FLOOR = floor  # lowest class difficulty before normalising
    return node


def compute_sample_probabilities(labels: np.ndarray, class_probabilities: np.ndarray) -> np.ndarray:
    """Per-sample draw probabilities (N,) giving class c the total mass `class_probabilities[c]`.

    p_i = q_{y_i} / n_{y_i} (inverse frequency within the class), so the draw is class-balanced
    whatever the class sizes. Classes without samples must have q_c = 0.
    """
    counts = np.bincount(labels, minlength=len(class_probabilities)).astype(np.float64)
    return class_probabilities[labels] / counts[labels]


def compute_class_difficulty(
    labels: np.ndarray, true_class_probabilities: np.ndarray, num_classes: int, gamma: float
) -> np.ndarray:
    """d_c = mean over class c's training samples of (1 - p_true)^gamma (AMLPF-CLIP resampling).

    labels: (N,); true_class_probabilities: (N,), NaN for samples with no prediction yet (they
    are left out of their class's mean). A class with no known sample takes the mean of the
    known classes (1 when nothing is known), so no class is NaN. Returns (num_classes,).
    """
    difficulty = np.power(1.0 - np.clip(true_class_probabilities, 0.0, 1.0), gamma)
    known = ~np.isnan(difficulty)
    sums = np.bincount(labels[known], difficulty[known], minlength=num_classes)
    counts = np.bincount(labels[known], minlength=num_classes)
    seen = counts > 0
    per_class = np.full(num_classes, np.mean(sums[seen] / counts[seen]) if seen.any() else 1.0)
    per_class[seen] = sums[seen] / counts[seen]
    return per_class


def compute_difficulty_class_probabilities(
    class_difficulty: np.ndarray, present: np.ndarray, smoothing: float, floor: float
) -> np.ndarray:
    """Class draw probabilities q (C,) from class difficulties d (C,):

    q_c = (1 - s) * max(d_c, f) / sum_j max(d_j, f) + s / C'   for the C' present classes,
    q_c = 0 for classes without training samples. With f > 0 or s > 0 no present class gets 0.
    """
    if not 0.0 <= smoothing <= 1.0 or floor < 0:
        raise ValueError(
            f"DIFFICULTY_SMOOTHING must be in [0, 1] and DIFFICULTY_FLOOR >= 0 (got {smoothing},"
            f" {floor})"
        )
    floored = np.where(present, np.maximum(class_difficulty, floor), 0.0)
    total = floored.sum()
    shares = floored / total if total > 0 else present / present.sum()
    return (1.0 - smoothing) * shares + smoothing * present / present.sum()


class _WeightedSampler(SamplerBase):
    """Draws `len(labels)` indices with replacement from per-class probabilities."""

    def __init__(self, labels: np.ndarray, generator: torch.Generator, cfg: CfgNode | None) -> None:
        super().__init__(labels, generator, cfg)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.present = np.bincount(self.labels, minlength=self.num_classes) > 0
        self.class_probabilities = self.present / max(1, self.present.sum())

    def draw(self) -> np.ndarray:
        weights = compute_sample_probabilities(self.labels, self.class_probabilities)
        drawn = torch.multinomial(
            torch.as_tensor(weights), len(self.labels), replacement=True, generator=self.generator
        )
        return drawn.numpy()

    def epoch_indices(self) -> np.ndarray:
        return self.draw()

    def state(self) -> dict:
        return {"class_probabilities": [round(float(q), 6) for q in self.class_probabilities]}


def _setting(cfg: CfgNode | None, key: str) -> float:
    value = cfg.get(f"DIFFICULTY_{key}") if cfg is not None else None
    return float(DIFFICULTY_DEFAULTS[key] if value is None else value)


@SAMPLERS.register("inverse_frequency")
class InverseFrequencySampler(_WeightedSampler):
    """Class-balanced: every present class has mass 1 / C', each sample 1 / (C' n_c)."""


@SAMPLERS.register("difficulty")
class DifficultySampler(_WeightedSampler):
    """Difficulty-aware class-balanced resampling (AMLPF-CLIP).

    Epoch 1 is a uniform permutation (every image once, so each has a p_true). Afterwards each
    epoch draws with replacement with class probabilities from `compute_difficulty_class_
    probabilities` over `compute_class_difficulty` of each sample's latest p_true (from the
    previous epoch, or earlier for a sample not drawn then), and inverse frequency within a class.
    """

    needs_feedback = True

    def __init__(self, labels: np.ndarray, generator: torch.Generator, cfg: CfgNode | None) -> None:
        super().__init__(labels, generator, cfg)
        self.true_class_probabilities = np.full(len(self.labels), np.nan)
        self.gamma = _setting(cfg, "GAMMA")
        self.smoothing = _setting(cfg, "SMOOTHING")
        self.floor = _setting(cfg, "FLOOR")
        self.class_difficulty = np.ones(self.num_classes)

    def update(self, indices: np.ndarray, true_class_probabilities: np.ndarray) -> None:
        self.true_class_probabilities[np.asarray(indices)] = true_class_probabilities

    def epoch_indices(self) -> np.ndarray:
        if np.isnan(self.true_class_probabilities).all():
            return SamplerBase.epoch_indices(self)  # uniform permutation
        self.class_difficulty = compute_class_difficulty(
            self.labels, self.true_class_probabilities, self.num_classes, self.gamma
        )
        self.class_probabilities = compute_difficulty_class_probabilities(
            self.class_difficulty, self.present, self.smoothing, self.floor
        )
        return self.draw()

    def state(self) -> dict:
        return {
            **super().state(),
            "class_difficulty": [round(float(d), 6) for d in self.class_difficulty],
        }
