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


def iterate_batches(sampler: SamplerBase, batch_size: int):
    """Endless stream of index batches; a batch never straddles two epochs' orderings oddly:
    leftovers of one epoch are topped up from the next, so every batch has `batch_size` items."""
    buffer = np.zeros(0, dtype=np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, sampler.epoch_indices().astype(np.int64)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]
