"""INPUT.STORE_SIZE through the run: training crops come from the larger stored image, every
method still sees the model input size, evaluation stays deterministic; the warm-up fraction
and the crop interpolation reach the shared loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainers import SYNTHETIC, build_everything, recipe_for

from fewclip.augment import augment_batch
from fewclip.config import ConfigError, build_config
from fewclip.hooks import LearningRateHook
from fewclip.run import execute_run

STORE = 96  # larger than the tiny model's input (64)


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_the_loop_feeds_the_model_input_size_from_a_larger_store(fast_opts, augment):
    opts = [*fast_opts, "INPUT.STORE_SIZE", str(STORE), "INPUT.AUGMENT", augment]
    _, _, bundle, trainer, train, _, test = build_everything("CLIPLoRA", opts, train_in_memory=True)
    assert bundle.image_size < STORE
    assert train.images.shape[1:3] == (STORE, STORE)  # training crops are cut from this
    assert test.images.shape[1:3] == (bundle.image_size,) * 2  # the deterministic input view
    shapes, original = [], trainer.compute_losses

    def spy(images, labels, indices):
        shapes.append(tuple(images.shape[-2:]))
        return original(images, labels, indices)

    trainer.compute_losses = spy
    trainer.fit(train, None)
    assert shapes == [(bundle.image_size,) * 2] * 3
    first = trainer.predict_probabilities(test)
    np.testing.assert_array_equal(first, trainer.predict_probabilities(test))  # deterministic


@pytest.mark.parametrize("trainer_name", ["ZeroShotCLIP", "LinearProbe", "CLIPLoRA", "SAVLT"])
def test_runs_complete_with_a_larger_store(fast_opts, trainer_name):
    cfg = build_config(
        recipe_for(trainer_name), SYNTHETIC, [*fast_opts, "INPUT.STORE_SIZE", str(STORE)]
    )
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("traceback")
    assert results["metrics"]["test"]["num_samples"] > 0


def test_a_store_smaller_than_the_model_input_fails_before_decoding(fast_opts, monkeypatch):
    import fewclip.images

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the size was checked")

    monkeypatch.setattr(fewclip.images, "decode_paths", no_decoding)
    cfg = build_config(recipe_for("CLIPLoRA"), SYNTHETIC, [*fast_opts, "INPUT.STORE_SIZE", "8"])
    results = execute_run(cfg)
    assert results["status"] == "failed"
    assert "INPUT.STORE_SIZE 8 is smaller than the model input" in results["error"]
    with pytest.raises(ConfigError, match="INPUT.CROP_INTERPOLATION 'area'"):
        build_config(recipe_for("CLIPLoRA"), SYNTHETIC, ["INPUT.CROP_INTERPOLATION", "area"])


def test_the_base_augmentation_uses_the_configured_interpolation(fast_opts):
    opts = [*fast_opts, "INPUT.CROP_INTERPOLATION", "bicubic"]
    *_, trainer, _, _, _ = build_everything("LinearProbe", opts)
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    state = trainer.generator.get_state()
    augmented = trainer.augment(images, np.arange(3))
    size = trainer.bundle.image_size
    generator = torch.Generator().set_state(state)
    expected = augment_batch(images, generator, (0.5, 1.0), size, "bicubic")
    assert augmented.shape[-1] == size
    torch.testing.assert_close(augmented, expected)
    bilinear = augment_batch(images, torch.Generator().set_state(state), (0.5, 1.0), size)
    assert not torch.allclose(augmented, bilinear)


def test_warm_up_fraction_is_a_share_of_the_steps(fast_opts):
    opts = [*fast_opts, "OPTIM.WARMUP_FRACTION", "0.4", "OPTIM.LR", "1.0", "OPTIM.MIN_LR", "0.0"]
    *_, trainer, _, _, _ = build_everything("LinearProbe", opts)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = []
    for step in range(10):
        ctx = type("Ctx", (), {"trainer": trainer, "optimizer": optimizer, "total": 10})()
        ctx.step = step
        LearningRateHook().before_step(ctx)
        rates.append(optimizer.param_groups[0]["lr"])
    np.testing.assert_allclose(rates[:4], [0.25, 0.5, 0.75, 1.0])  # 4 = 0.4 x 10 warm-up steps
    assert rates[4] == pytest.approx(1.0) and rates[9] < rates[5]
