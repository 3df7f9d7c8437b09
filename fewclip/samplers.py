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
# Our class-balanced variant (defaults of add_sampler_keys); AMLPF's paper recipe switches the
# extras off (SOURCE_DIFFICULTY): the released code's draw (AMLPF-CLIP main.py:384-407).
DIFFICULTY_DEFAULTS = {
    "GAMMA": 2.0,
    "SMOOTHING": 0.1,
    "FLOOR": 0.01,
    "INVERSE_FREQUENCY": True,
    "ESTIMATE": "latest",
}
SOURCE_DIFFICULTY = {
    "SMOOTHING": 0.0,
    "FLOOR": 0.0,
    "INVERSE_FREQUENCY": False,
    "ESTIMATE": "source",
}
DIFFICULTY_ESTIMATES = ("latest", "source")


def add_sampler_keys(node: CfgNode, sampler: str = "uniform", **overrides) -> CfgNode:
    """Add SAMPLER and the difficulty sampler's keys to a trainer's config node (`overrides`,
    e.g. `**SOURCE_DIFFICULTY`, replace defaults by key without the DIFFICULTY_ prefix)."""
    value = {**DIFFICULTY_DEFAULTS, **overrides}
    node.SAMPLER = sampler  # registered sampler: uniform, inverse_frequency, difficulty
    node.DIFFICULTY_GAMMA = value["GAMMA"]  # gamma of the class difficulty mean (1 - p_true)^gamma
    node.DIFFICULTY_SMOOTHING = value["SMOOTHING"]  # share of the class draw uniform over classes
    node.DIFFICULTY_FLOOR = value["FLOOR"]  # lowest class difficulty before normalising
    node.DIFFICULTY_INVERSE_FREQUENCY = value["INVERSE_FREQUENCY"]  # class mass / n_c per sample
    node.DIFFICULTY_ESTIMATE = value["ESTIMATE"]  # "latest" p per image | "source" last epoch draws
    return node


def check_sampler_node(node: CfgNode, key: str) -> None:
    """Build-time check of a node made by `add_sampler_keys`: one line naming key and choices."""
    if node.SAMPLER not in SAMPLERS:
        raise ValueError(f"{key}.SAMPLER {node.SAMPLER!r} is not one of {', '.join(SAMPLERS)}")
    if node.DIFFICULTY_ESTIMATE not in DIFFICULTY_ESTIMATES:
        raise ValueError(
            f"{key}.DIFFICULTY_ESTIMATE {node.DIFFICULTY_ESTIMATE!r} is not one of "
            f"{', '.join(DIFFICULTY_ESTIMATES)}"
        )
    compute_difficulty_class_probabilities(
        np.ones(1), np.ones(1, bool), node.DIFFICULTY_SMOOTHING, node.DIFFICULTY_FLOOR
    )


def compute_sample_probabilities(
    labels: np.ndarray, class_probabilities: np.ndarray, inverse_frequency: bool = True
) -> np.ndarray:
    """Per-sample draw probabilities (N,) from class probabilities q (C,).

    inverse_frequency: p_i = q_{y_i} / n_{y_i}, so class c gets mass q_c whatever its size
    (class-balanced). Off (the source, main.py:405-406: WeightedRandomSampler over
    class_weights[labels]): p_i = q_{y_i} / sum_j q_{y_j}, so class c gets mass prop. n_c q_c.
    Classes without samples must have q_c = 0.
    """
    if not inverse_frequency:
        weights = class_probabilities[labels].astype(np.float64)
        return weights / weights.sum()
    counts = np.bincount(labels, minlength=len(class_probabilities)).astype(np.float64)
    return class_probabilities[labels] / counts[labels]


def compute_drawn_class_difficulty(
    drawn_labels: np.ndarray,
    drawn_probabilities: np.ndarray,
    previous: np.ndarray,
    gamma: float,
) -> np.ndarray:
    """The source's class weights (main.py:392-404): w_c = mean over the previous epoch's draws
    of class c (repeats counted) of (1 - p_true)^gamma, p_true = exp(-CE). A class not drawn
    keeps `previous[c]` (the source takes the mean of nothing: NaN). Returns (C,)."""
    difficulty = np.power(1.0 - np.clip(drawn_probabilities, 0.0, 1.0), gamma)
    sums = np.bincount(drawn_labels, difficulty, minlength=len(previous))
    counts = np.bincount(drawn_labels, minlength=len(previous))
    return np.where(counts > 0, sums / np.maximum(counts, 1), previous)


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

    inverse_frequency = True

    def draw(self) -> np.ndarray:
        weights = compute_sample_probabilities(
            self.labels, self.class_probabilities, self.inverse_frequency
        )
        drawn = torch.multinomial(
            torch.as_tensor(weights), len(self.labels), replacement=True, generator=self.generator
        )
        return drawn.numpy()

    def epoch_indices(self) -> np.ndarray:
        return self.draw()

    def state(self) -> dict:
        return {"class_probabilities": [round(float(q), 6) for q in self.class_probabilities]}


def _setting(cfg: CfgNode | None, key: str):
    value = cfg.get(f"DIFFICULTY_{key}") if cfg is not None else None
    return DIFFICULTY_DEFAULTS[key] if value is None else value


@SAMPLERS.register("inverse_frequency")
class InverseFrequencySampler(_WeightedSampler):
    """Class-balanced: every present class has mass 1 / C', each sample 1 / (C' n_c)."""


@SAMPLERS.register("difficulty")
class DifficultySampler(_WeightedSampler):
    """Difficulty-aware resampling (AMLPF-CLIP, main.py:384-407).

    Each epoch draws len(labels) indices with replacement from class probabilities
    `compute_difficulty_class_probabilities` of the class difficulties (SMOOTHING, FLOOR) and
    per-sample probabilities `compute_sample_probabilities` (INVERSE_FREQUENCY). ESTIMATE
    "source": epoch 1 draws from uniform class weights, later epochs take the class means over
    the previous epoch's draws (`compute_drawn_class_difficulty`), as the released code.
    "latest": epoch 1 is a permutation (every image gets a p_true), later epochs use each
    image's latest p_true (`compute_class_difficulty`).
    """

    needs_feedback = True

    def __init__(self, labels: np.ndarray, generator: torch.Generator, cfg: CfgNode | None) -> None:
        super().__init__(labels, generator, cfg)
        self.true_class_probabilities = np.full(len(self.labels), np.nan)
        self.gamma = float(_setting(cfg, "GAMMA"))
        self.smoothing = float(_setting(cfg, "SMOOTHING"))
        self.floor = float(_setting(cfg, "FLOOR"))
        self.inverse_frequency = bool(_setting(cfg, "INVERSE_FREQUENCY"))
        self.estimate = str(_setting(cfg, "ESTIMATE"))
        self.class_difficulty = np.ones(self.num_classes)
        self.drawn: list[np.ndarray] = []  # (index, p_true) rows since the last epoch began

    def update(self, indices: np.ndarray, true_class_probabilities: np.ndarray) -> None:
        self.true_class_probabilities[np.asarray(indices)] = true_class_probabilities
        self.drawn.append(np.stack([np.asarray(indices, np.float64), true_class_probabilities]))

    def epoch_indices(self) -> np.ndarray:
        if np.isnan(self.true_class_probabilities).all():
            if self.estimate == "source":
                return self.draw()  # uniform class weights (main.py:390-391)
            return SamplerBase.epoch_indices(self)  # uniform permutation
        if self.estimate == "source":
            drawn = np.concatenate(self.drawn, axis=1) if self.drawn else np.zeros((2, 0))
            self.drawn = []
            self.class_difficulty = compute_drawn_class_difficulty(
                self.labels[drawn[0].astype(np.int64)], drawn[1], self.class_difficulty, self.gamma
            )
        else:
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
