"""Class-balanced samplers: formulas on hand-made labels and probabilities, draws, loop feedback."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from yacs.config import CfgNode

from fewclip.config import get_cfg_defaults
from fewclip.hooks import SamplerFeedbackHook
from fewclip.registry import SAMPLERS
from fewclip.samplers import (
    add_sampler_keys,
    compute_class_difficulty,
    compute_difficulty_class_probabilities,
    compute_sample_probabilities,
)
from fewclip.trainer import TrainerBase


def sampler_node(name: str, **keys) -> CfgNode:
    node = add_sampler_keys(CfgNode(), name)
    for key, value in keys.items():
        node[key] = value
    return node


def test_sample_probabilities_give_each_class_its_mass():
    labels = np.array([0, 0, 0, 1])
    probabilities = compute_sample_probabilities(labels, np.array([0.5, 0.5]))
    np.testing.assert_allclose(probabilities, [1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_inverse_frequency_draws_are_class_balanced_with_replacement():
    labels = np.array([0] * 9 + [1] * 3)
    sampler = SAMPLERS.get("inverse_frequency")(
        labels, torch.Generator().manual_seed(0), sampler_node("inverse_frequency")
    )
    epochs = [sampler.epoch_indices() for _ in range(400)]
    assert all(len(epoch) == len(labels) for epoch in epochs)
    drawn = np.concatenate(epochs)
    assert abs(np.mean(labels[drawn] == 1) - 0.5) < 0.02  # uniform draw would give 0.25
    assert any(len(set(epoch)) < len(epoch) for epoch in epochs)  # with replacement
    assert sampler.state() == {"class_probabilities": [0.5, 0.5]}
    again = SAMPLERS.get("inverse_frequency")(labels, torch.Generator().manual_seed(0), None)
    np.testing.assert_array_equal(again.epoch_indices(), epochs[0])


def test_class_difficulty_is_the_mean_focal_term_and_never_nan():
    labels = np.array([0, 0, 1, 1, 2])
    true_class = np.array([0.9, 0.5, 0.2, np.nan, np.nan])  # class 2 has no prediction yet
    difficulty = compute_class_difficulty(labels, true_class, num_classes=3, gamma=2.0)
    d0, d1 = (0.1**2 + 0.5**2) / 2, 0.8**2
    np.testing.assert_allclose(difficulty, [d0, d1, (d0 + d1) / 2])
    nothing = compute_class_difficulty(labels, np.full(5, np.nan), 3, 2.0)
    np.testing.assert_allclose(nothing, [1.0, 1.0, 1.0])


def test_difficulty_class_probabilities_formula_floor_and_absent_class():
    difficulty = np.array([0.13, 0.64, 0.0, 0.5])
    present = np.array([True, True, True, False])  # class 3 has no training image
    q = compute_difficulty_class_probabilities(difficulty, present, smoothing=0.1, floor=0.01)
    floored = np.array([0.13, 0.64, 0.01, 0.0])
    expected = 0.9 * floored / floored.sum() + 0.1 * present / 3
    np.testing.assert_allclose(q, expected)
    assert q[2] > 0 and q[3] == 0 and np.isclose(q.sum(), 1.0)
    perfect = compute_difficulty_class_probabilities(np.zeros(4), present, 0.0, 0.0)
    np.testing.assert_allclose(perfect, [1 / 3, 1 / 3, 1 / 3, 0])  # all solved: balanced
    with pytest.raises(ValueError, match="DIFFICULTY_SMOOTHING"):
        compute_difficulty_class_probabilities(difficulty, present, 1.5, 0.0)


def test_difficulty_sampler_uniform_first_epoch_then_follows_the_weights():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    node = sampler_node("difficulty", DIFFICULTY_SMOOTHING=0.2, DIFFICULTY_FLOOR=0.05)
    sampler = SAMPLERS.get("difficulty")(labels, torch.Generator().manual_seed(1), node)
    first = sampler.epoch_indices()
    assert sorted(first) == list(range(8))  # a permutation: every image once
    # class 2 never reported (as if absent from the last epoch): must get a finite, > 0 weight
    sampler.update(np.arange(6), np.array([0.9, 0.9, 0.8, 0.9, 0.1, 0.3]))
    draws = np.concatenate([sampler.epoch_indices() for _ in range(1500)])
    difficulty = compute_class_difficulty(labels, sampler.true_class_probabilities, 3, 2.0)
    expected = compute_difficulty_class_probabilities(difficulty, np.ones(3, bool), 0.2, 0.05)
    np.testing.assert_allclose(sampler.class_probabilities, expected)
    assert np.all(np.isfinite(sampler.class_probabilities)) and np.all(expected > 0)
    shares = np.bincount(labels[draws], minlength=3) / len(draws)
    np.testing.assert_allclose(shares, expected, atol=0.02)
    assert set(sampler.state()) == {"class_probabilities", "class_difficulty"}


class _ToyTrainer(TrainerBase):
    """A linear classifier on mean pixel colour: the smallest trainer the loop can run."""

    @classmethod
    def config_node(cls) -> CfgNode:
        return sampler_node("difficulty")

    def build(self) -> None:
        self.network["head"] = nn.Linear(3, len(self.class_names))

    def compute_losses(self, images, labels, indices) -> dict:
        logits = self.compute_logits(images)
        if self.sets_logits:
            self.batch_logits = logits
        return {"cross_entropy": nn.functional.cross_entropy(logits, labels)}

    def compute_logits(self, images, items=()):
        return self.network["head"](images.mean(dim=(2, 3)))


def make_toy_trainer(sets_logits: bool) -> _ToyTrainer:
    cfg = get_cfg_defaults()
    cfg.OPTIM.MAX_ITERS = 4
    cfg.TRAINER[_ToyTrainer.config_key()] = _ToyTrainer.config_node()
    bundle = SimpleNamespace(
        model=nn.Identity(), mean=(0.5,) * 3, std=(0.5,) * 3, image_size=8, aligned=True
    )
    dataset = SimpleNamespace(class_names=["a", "b"], prompts=None)
    _ToyTrainer.sets_logits = sets_logits
    return _ToyTrainer(cfg, bundle, dataset, torch.device("cpu"))


def test_loop_gives_the_sampler_softmax_probability_of_the_true_class():
    trainer = make_toy_trainer(sets_logits=True)
    received = []
    spy = SimpleNamespace(update=lambda indices, p: received.append((indices, p)))
    trainer.batch_logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    ctx = SimpleNamespace(
        trainer=trainer,
        batches=SimpleNamespace(sampler=spy),
        indices=np.array([5, 7]),
        labels=torch.tensor([1, 0]),
    )
    SamplerFeedbackHook().after_step(ctx)
    indices, true_class = received[0]
    np.testing.assert_array_equal(indices, [5, 7])
    np.testing.assert_allclose(true_class, [0.5, np.exp(2) / (np.exp(2) + 1)], rtol=1e-6)


def test_difficulty_sampler_needs_batch_logits(tmp_path):
    from fewclip.trainer import ImageSet

    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    train = ImageSet(images=images, labels=np.array([0, 0, 0, 0, 1, 1]), centers=["c"] * 6)
    make_toy_trainer(sets_logits=True).fit(train, None)
    with pytest.raises(RuntimeError, match="needs the batch logits"):
        make_toy_trainer(sets_logits=False).fit(train, None)
