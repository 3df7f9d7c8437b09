"""AMLPF-CLIP: prompt fusion and multi-view formulas, trainable sets, end-to-end runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewclip.backbones import build_clip
from fewclip.config import build_config
from fewclip.fusion import PromptFusion, compute_fused_logits, compute_level_logits
from fewclip.multiview import compute_crop_boxes, compute_multiview_logits
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run
from fewclip.trainer import build_param_groups
from fewclip_trainers.amlpf import AMLPF, LogitScale

RECIPE, DATA = "configs/trainers/amlpf.yaml", "configs/datasets/synthetic.yaml"
CLASSES = ["normal", "lsil", "hsil", "carcinoma"]


def test_level_logits_are_scaled_cosines_per_level():
    features = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 4, 5), dim=-1)
    logits = compute_level_logits(features, text, 10.0)
    assert logits.shape == (2, 3, 4)
    torch.testing.assert_close(logits[1], 10.0 * features @ text[1].t())


def test_fused_logits_are_the_weighted_sum_of_levels():
    levels = torch.arange(24.0).reshape(3, 2, 4)
    weights = torch.tensor([1.0, 2.0, -0.5])
    expected = levels[0] + 2 * levels[1] - 0.5 * levels[2]
    torch.testing.assert_close(compute_fused_logits(levels, weights), expected)


def test_fusion_raw_starts_at_one_and_softmax_sums_to_one():
    raw = PromptFusion(3, "raw")
    torch.testing.assert_close(raw.level_weights(), torch.ones(3))
    soft = PromptFusion(3, "softmax")
    torch.testing.assert_close(soft.level_weights(), torch.full((3,), 1 / 3))
    with torch.no_grad():
        soft.weights.copy_(torch.tensor([2.0, -1.0, 0.3]))
    weights = soft.level_weights()
    assert torch.isclose(weights.sum(), torch.tensor(1.0)) and bool((weights > 0).all())
    levels = torch.randn(3, 2, 4)
    torch.testing.assert_close(soft(levels), compute_fused_logits(levels, weights))
    assert soft.describe(["label", "short", "description"])["label"] == pytest.approx(
        float(weights[0].detach()), abs=1e-6
    )
    with pytest.raises(ValueError, match="fusion mode"):
        PromptFusion(3, "mean")


def test_crop_boxes_are_fixed_grid_positions():
    assert compute_crop_boxes(8, 1, 0.5) == [(2, 2, 4)]
    assert compute_crop_boxes(8, 4, 0.5) == [(0, 0, 4), (0, 4, 4), (4, 0, 4), (4, 4, 4)]
    assert compute_crop_boxes(8, 5, 0.5) == [(0, 0, 4), (0, 4, 4), (2, 2, 4), (4, 0, 4), (4, 4, 4)]
    with pytest.raises(ValueError, match="CROPS"):
        compute_crop_boxes(8, 0, 0.5)


def test_multiview_logits_average_crops_then_the_full_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)

    def channel_means(batch):  # a "model" whose logits are the mean of each channel
        return batch.mean(dim=(2, 3))

    crops = [
        channel_means(
            torch.nn.functional.interpolate(
                images[:, :, top : top + side, left : left + side], size=(8, 8), mode="bilinear"
            )
        )
        for top, left, side in compute_crop_boxes(8, 4, 0.5)
    ]
    expected = (torch.stack(crops).mean(0) + channel_means(images)) / 2
    result = compute_multiview_logits(channel_means, images, 4, 0.5)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(compute_multiview_logits(channel_means, images, 4, 0.5), result)


def test_logit_scale_is_clamped():
    assert float(LogitScale(math.log(500.0), 100.0)().detach()) == pytest.approx(100.0)
    assert float(LogitScale(math.log(20.0), 100.0)().detach()) == pytest.approx(20.0)


def build_trainer(*opts: str) -> AMLPF:
    cfg = build_config(RECIPE, DATA, list(opts))
    prompts = load_prompt_file("configs/prompts/synthetic.yaml", CLASSES)
    dataset = SimpleNamespace(class_names=CLASSES, prompts=prompts)
    return AMLPF(cfg, build_clip(cfg.MODEL), dataset, torch.device("cpu"))


def test_lora_student_trains_lora_and_fusion_weights_only():
    trainer = build_trainer()
    names = [name for name, _ in trainer.trainable_named_parameters()]
    assert "fusion.weights" in names
    others = [n for n in names if n != "fusion.weights"]
    assert others and all(".lora_" in n and n.startswith("clip.visual.") for n in others)


def test_full_student_with_clamped_scale_trains_visual_encoder_and_scale_without_decay():
    trainer = build_trainer("TRAINER.AMLPF.STUDENT", "full", "TRAINER.AMLPF.LOGIT_SCALE", "clamped")
    named = trainer.trainable_named_parameters()
    names = {name for name, _ in named}
    visual = {f"clip.{n}" for n, _ in trainer.clip.named_parameters() if n.startswith("visual.")}
    assert names == visual | {"fusion.weights", "scale.logit_scale"}
    decay, no_decay = build_param_groups(named, 0.1)
    decayed = {id(p) for p in decay["params"]}
    scale, fusion = trainer.network["scale"].logit_scale, trainer.network["fusion"].weights
    assert id(scale) not in decayed and id(fusion) not in decayed
    assert any(p is scale for p in no_decay["params"])


def test_text_lora_is_refused_because_text_features_are_cached():
    with pytest.raises(ValueError, match="LORA.ENCODER vision"):
        build_trainer("LORA.ENCODER", "both")


def test_levels_are_scored_against_cached_text_features():
    trainer = build_trainer()
    level_text = trainer.cached_level_text()
    assert level_text.shape == (3, 4, 64)
    assert trainer.cached_level_text() is level_text  # computed once
    torch.testing.assert_close(level_text[2], trainer.text_features("description"))
    images = torch.randn(2, 3, 64, 64)
    features = trainer.compute_image_features(images)
    scale = trainer.clip.logit_scale.exp()
    expected = sum(scale * features @ level_text[k].t() for k in range(3))  # raw weights = 1
    torch.testing.assert_close(trainer.compute_logits(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["TRAINER.AMLPF.FUSION", "softmax", "TRAINER.AMLPF.MULTIVIEW.CROPS", "2"],
    ],
)
def test_amlpf_runs_end_to_end(fast_opts, extra):
    cfg = build_config(RECIPE, DATA, fast_opts + extra)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    training = results["training"]
    weights = list(training["fusion_weights"].values())
    assert list(training["fusion_weights"]) == ["label", "short", "description"]
    if extra:
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(training["sampler"]["class_probabilities"]).all()
    assert 0 <= results["metrics"]["test"]["accuracy"] <= 1
