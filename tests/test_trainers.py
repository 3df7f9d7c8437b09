"""Every registered trainer, over the registry: builds on the tiny model, takes steps, trains only
what it declares, restores train() mode after validation, round-trips a checkpoint, evaluates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewclip.config import build_config
from fewclip.evaluation import evaluate_set, validation_score
from fewclip.registry import DATASETS, TRAINERS
from fewclip.run import build_image_set, load_clip
from fewclip.splits import build_split

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ROOT / "configs" / "datasets" / "synthetic.yaml"


def recipe_for(trainer_name: str) -> Path:
    for path in sorted((ROOT / "configs" / "trainers").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("TRAINER", {}).get("NAME") == trainer_name:
            return path
    raise AssertionError(f"no recipe in configs/trainers/ for trainer {trainer_name}")


def build_everything(trainer_name: str, opts: list[str], train_in_memory: bool = False):
    cfg = build_config(recipe_for(trainer_name), SYNTHETIC, opts)
    dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
    split = build_split(dataset, cfg)
    bundle = load_clip(cfg)
    trainer = TRAINERS.get(cfg.TRAINER.NAME)(cfg, bundle, dataset, torch.device("cpu"))
    train = build_image_set(split.train, bundle.image_size, cfg, in_memory=train_in_memory)
    val = build_image_set(split.val, bundle.image_size, cfg)
    test = build_image_set(split.test, bundle.image_size, cfg)
    return cfg, dataset, bundle, trainer, train, val, test


# The package's trainers (tests may register throw-away trainers of their own).
PACKAGE_TRAINERS = [
    n for n in TRAINERS.names() if TRAINERS.get(n).__module__.startswith("fewclip_trainers.")
]


def test_every_built_in_trainer_is_under_contract():
    assert len(PACKAGE_TRAINERS) >= 7 and "CLIPLoRA" in PACKAGE_TRAINERS


def check_trainer_contract(trainer_name: str, trainer, dataset, train, val, test) -> None:
    """Trains only what it declares (and something, if it declares anything), leaves every other
    parameter untouched, and evaluates the whole test set."""
    trainable = {name for name, _ in trainer.trainable_named_parameters()}
    patterns = [re.compile(p) for p in type(trainer).trainable_patterns]
    undeclared = [n for n in trainable if not any(p.search(n) for p in patterns)]
    assert not undeclared, f"{trainer_name} trains undeclared parameters: {undeclared[:5]}"
    if type(trainer).trains and type(trainer).trainable_patterns:
        assert trainable, f"{trainer_name} declares trainable parameters but has none"
    before = {n: p.detach().clone() for n, p in trainer.network.named_parameters()}
    trainer.fit(train, val, validation_score)
    for name, param in trainer.network.named_parameters():
        if name not in trainable:
            assert torch.equal(param, before[name]), f"{trainer_name} changed frozen {name}"
    if trainable and type(trainer).trains:
        assert any(
            not torch.equal(p, before[n])
            for n, p in trainer.network.named_parameters()
            if n in trainable
        ), f"{trainer_name} trained nothing"
    metrics = evaluate_set(trainer, test, list(dataset.positive_classes), 10)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_samples"] == len(test)


@pytest.mark.parametrize("trainer_name", PACKAGE_TRAINERS)
def test_trainer_contract(trainer_name, fast_opts):
    opts = [*fast_opts, "EVAL.VAL_EVERY", "2", "EVAL.SELECT", "best_val"]
    cfg, dataset, bundle, trainer, train, val, test = build_everything(trainer_name, opts)
    check_trainer_contract(trainer_name, trainer, dataset, train, val, test)

    state = trainer.checkpoint_state()
    fresh = build_everything(trainer_name, opts)[3]
    fresh.load_checkpoint_state(state)
    expected = trainer.predict_probabilities(test)
    np.testing.assert_allclose(fresh.predict_probabilities(test), expected, atol=1e-5)


def test_training_mode_restored_after_mid_training_validation(fast_opts):
    opts = [*fast_opts, "OPTIM.MAX_ITERS", "4", "EVAL.VAL_EVERY", "1"]
    *_, trainer, train, val, _ = build_everything("CLIPLoRA", opts)
    modes, eval_modes = [], []
    original_losses, original_logits = trainer.compute_losses, trainer.compute_logits

    def spy_losses(images, labels, indices):
        modes.append(trainer.network.training)
        return original_losses(images, labels, indices)

    def spy_logits(images, items=()):
        eval_modes.append(trainer.network.training)
        return original_logits(images, items)

    trainer.compute_losses, trainer.compute_logits = spy_losses, spy_logits
    trainer.fit(train, val, validation_score)
    assert modes == [True] * 4  # every step after a validation runs in train mode again
    assert eval_modes and not any(eval_modes)  # validation itself runs in eval mode


def test_optimizer_never_holds_a_parameter_twice(fast_opts):
    from fewclip.trainer import build_param_groups

    *_, trainer, _, _, _ = build_everything("CLIPLoRA", fast_opts)
    named = trainer.trainable_named_parameters()
    groups = build_param_groups(named + named[:3], 0.1)  # a shared parameter listed twice
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(named)


def test_each_evaluation_batch_reaches_compute_logits_with_its_own_items(fast_opts):
    *_, trainer, _, _, test = build_everything("CLIPLoRA", [*fast_opts, "EVAL.BATCH_SIZE", "3"])
    seen, original = [], trainer.compute_logits

    def spy_logits(images, items=()):
        assert len(items) == len(images)
        seen.append([item.path for item in items])
        return original(images, items)

    trainer.compute_logits = spy_logits
    trainer.predict_probabilities(test)
    assert [path for batch in seen for path in batch] == [item.path for item in test.items]
    assert len(test) > 3 and max(len(batch) for batch in seen) == 3


def test_linear_probe_balanced_class_weight_is_inverse_frequency_weighting():
    """CLASS_WEIGHT balanced = every image weighted N / (K n_class) (sklearn's rule); on a 1:9
    task with overlapping classes it predicts the minority class where the plain fit does not."""
    from sklearn.linear_model import LogisticRegression

    from fewclip_trainers.linear_probe import fit_logistic_regression

    rng = np.random.default_rng(0)
    labels = np.array([0] * 90 + [1] * 10)
    features = rng.normal(size=(100, 4)) + labels[:, None] * 0.8
    weight, bias = fit_logistic_regression(features, labels, 2, 1.0, 1000, "balanced")
    counts = np.bincount(labels)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(
        features, labels, sample_weight=len(labels) / (2 * counts[labels])
    )
    torch.testing.assert_close(
        torch.tensor(weight[1] - weight[0]), torch.tensor(reference.coef_[0], dtype=torch.float32)
    )
    plain = fit_logistic_regression(features, labels, 2, 1.0, 1000)
    minority = [
        int(((features @ w.T + b).argmax(axis=1) == 1).sum()) for w, b in (plain, (weight, bias))
    ]
    assert minority[0] < 10 <= minority[1]
