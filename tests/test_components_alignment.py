"""Formula-level tests of the SAVLT and CaM-VLA components on hand-made tensors: dual alignment,
prototypes, multi-positive InfoNCE, cross-attention, ROI rules and masks, pooling, tokens."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fewclip.alignment import (
    ClassPrototypes,
    compute_dual_alignment_logits,
    compute_dual_alignment_loss,
    compute_dual_alignment_mixture,
)
from fewclip.backbones import build_clip
from fewclip.config import get_cfg_defaults
from fewclip.contrastive import (
    CrossAttention,
    LearnedAlignment,
    compute_masked_mean,
    compute_multi_positive_infonce,
)
from fewclip.data import ImageError
from fewclip.lora import apply_lora
from fewclip.pooling import (
    StructurePooling,
    compute_patch_intensity,
    compute_rule_region,
    compute_surface_region,
    fill_empty_regions,
    load_region_mask,
)
from fewclip.tokens import encode_image_tokens, encode_text_tokens, project_image_tokens

EYE = torch.eye(2)
SWAPPED = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


def test_prototypes_start_orthonormal_and_are_unit_norm_at_every_forward():
    prototypes = ClassPrototypes(3, 8, torch.Generator().manual_seed(0))
    rows = prototypes()
    assert torch.allclose(rows @ rows.t(), torch.eye(3), atol=1e-5)
    with torch.no_grad():
        prototypes.weight.mul_(torch.tensor([[3.0], [0.5], [7.0]]))
    assert torch.allclose(prototypes().norm(dim=1), torch.ones(3), atol=1e-6)
    again = ClassPrototypes(3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, ClassPrototypes(3, 8, torch.Generator().manual_seed(0)).weight)


def test_dual_alignment_loss_matches_hand_computation():
    # f = T = I; P swaps the classes. s = 2: text CE = log(1 + e^-2), prototype CE = log(1 + e^2)
    labels = torch.tensor([0, 1])
    loss = compute_dual_alignment_loss(EYE, EYE, SWAPPED, labels, scale=2.0, weight=0.25)
    expected = 0.75 * math.log(1 + math.exp(-2)) + 0.25 * math.log(1 + math.exp(2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    only_text = compute_dual_alignment_loss(EYE, EYE, SWAPPED, labels, 2.0, 0.0)
    only_prototypes = compute_dual_alignment_loss(EYE, EYE, SWAPPED, labels, 2.0, 1.0)
    assert only_text.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert only_prototypes.item() == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    # cosine: the norms of the inputs do not matter
    scaled = compute_dual_alignment_loss(5 * EYE, 3 * EYE, 0.1 * SWAPPED, labels, 2.0, 0.25)
    assert scaled.item() == pytest.approx(expected, rel=1e-6)


def test_dual_alignment_inference_is_the_same_mixture_of_logits():
    features = torch.tensor([[1.0, 0.0]])
    text_logits, prototype_logits = compute_dual_alignment_logits(features, EYE, SWAPPED, 2.0, 0.5)
    assert torch.equal(text_logits, torch.tensor([[2.0, 0.0]]))
    assert torch.equal(prototype_logits, torch.tensor([[0.0, 2.0]]))
    mixture = compute_dual_alignment_mixture(features, EYE, SWAPPED, 2.0, 0.25)
    assert torch.allclose(mixture, torch.tensor([[1.5, 0.5]]))
    with pytest.raises(ValueError, match="weight must be in"):
        compute_dual_alignment_mixture(features, EYE, SWAPPED, 2.0, 1.5)


def reference_infonce(first, second, labels, temperature):
    """The SupCon L_out formula written with loops, both directions averaged."""
    first = F.normalize(first, dim=-1).tolist()
    second = F.normalize(second, dim=-1).tolist()
    labels = labels.tolist()

    def direction(anchors, others):
        total = 0.0
        for i, anchor in enumerate(anchors):
            scores = [sum(a * b for a, b in zip(anchor, other)) / temperature for other in others]
            log_norm = math.log(sum(math.exp(score) for score in scores))
            positives = [j for j in range(len(labels)) if labels[j] == labels[i]]
            total += -sum(scores[j] - log_norm for j in positives) / len(positives)
        return total / len(anchors)

    return 0.5 * (direction(first, second) + direction(second, first))


def test_multi_positive_infonce_matches_the_formula_and_reduces_to_clip_loss():
    # two samples of one class, first = second = (e1, e2), t = 1: every supcon_out term is
    # log(1 + e) - 1/2; the source form is -log(1) = 0 (all the probability is on positives)
    loss = compute_multi_positive_infonce(EYE, EYE, torch.tensor([0, 0]), 1.0, "supcon_out")
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 0.5, rel=1e-6)
    assert compute_multi_positive_infonce(EYE, EYE, torch.tensor([0, 0]), 1.0).item() == 0.0
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    labels = torch.tensor([0, 1, 0, 2, 1])
    value = compute_multi_positive_infonce(first, second, labels, 0.5, "supcon_out").item()
    assert value == pytest.approx(reference_infonce(first, second, labels, 0.5), rel=1e-5)
    distinct = torch.arange(5)
    logits = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).t() / 0.5
    clip_loss = 0.5 * (F.cross_entropy(logits, distinct) + F.cross_entropy(logits.t(), distinct))
    assert compute_multi_positive_infonce(first, second, distinct, 0.5).item() == pytest.approx(
        clip_loss.item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="temperature"):
        compute_multi_positive_infonce(first, second, labels, 0.0)


def test_cross_attention_ignores_padding_and_starts_as_identity():
    attention = CrossAttention(4, 2)
    generator = torch.Generator().manual_seed(1)
    query, keys = (
        torch.randn(2, 3, 4, generator=generator),
        torch.randn(2, 5, 4, generator=generator),
    )
    padding = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    output, weights = attention(query, keys, padding)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 3))
    assert torch.all(weights[padding.unsqueeze(1).expand_as(weights)] == 0)
    # one kept key: identity projections give back that key for every query
    assert torch.allclose(output[0], keys[0, :1].expand(3, 4), atol=1e-6)
    changed = keys.clone()
    changed[1, 3:] = 100.0
    assert torch.allclose(attention(query, changed, padding)[0], output)
    with pytest.raises(ValueError, match="heads"):
        CrossAttention(6, 4)


def test_masked_mean_and_class_aware_modules_ignore_invalid_words():
    values = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(compute_masked_mean(values, valid), torch.tensor([[2.0], [4.0]]))
    module = LearnedAlignment(4, 2)
    generator = torch.Generator().manual_seed(2)
    words, patches = (
        torch.randn(2, 3, 4, generator=generator),
        torch.randn(2, 6, 4, generator=generator),
    )
    text, image = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    anchor, visual, maps = module.attend_text_to_vision(text, words, valid, patches)
    assert visual.shape == (2, 4) and torch.allclose(maps.sum(dim=1), torch.ones(2))
    assert torch.equal(anchor, text)
    anchor, textual, weights = module.attend_vision_to_text(image, patches, words, valid)
    assert textual.shape == (2, 4) and weights[0, 2] == 0 and torch.equal(anchor, image)
    changed = words.clone()
    changed[0, 2] = -50.0
    assert torch.allclose(module.attend_text_to_vision(text, changed, valid, patches)[1], visual)
    assert torch.allclose(module.attend_vision_to_text(image, patches, changed, valid)[1], textual)


def test_surface_region_on_a_hand_made_grid():
    # rows top to bottom; column 0 turns bright at row 1, column 1 at row 2, column 2 never
    intensity = torch.tensor([[[0.0, 0.0, 0.1], [1.0, 0.1, 0.1], [0.9, 0.8, 0.2], [0.7, 0.6, 0.3]]])
    region = compute_surface_region(intensity, threshold=0.5)
    expected = torch.tensor([[[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)
    assert torch.equal(region, expected)
    shallow = compute_surface_region(intensity, threshold=0.5, depth=1)
    expected_shallow = torch.tensor(
        [[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]], dtype=torch.bool
    )
    assert torch.equal(shallow, expected_shallow)
    assert not compute_surface_region(torch.full((1, 4, 3), 0.4), 0.0).any()  # flat image


def test_patch_intensity_undoes_clip_normalisation_and_rules():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    pixels = torch.zeros(1, 3, 8, 8)
    pixels[:, :, 4:] = 1.0  # bottom half white
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    intensity = compute_patch_intensity(normalised, mean, std, (2, 2))
    assert torch.allclose(intensity, torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]), atol=1e-6)
    region = compute_rule_region(normalised, "below_surface", mean, std, (2, 2))
    assert region.tolist() == [[False, False, True, True]]
    assert compute_rule_region(normalised, "all", mean, std, (2, 2)).all()
    with pytest.raises(ValueError, match="unknown region rule"):
        compute_rule_region(normalised, "edges", mean, std, (2, 2))


def test_region_mask_file_is_resized_to_the_patch_grid(tmp_path):
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[16:] = 1  # any non-zero value is inside; bottom half
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    region = load_region_mask(str(tmp_path / "mask.png"), 64, (4, 4)).reshape(4, 4)
    assert region[2:].all() and not region[:2].any()
    with pytest.raises(ImageError, match="missing.png"):
        load_region_mask(str(tmp_path / "missing.png"), 64, (4, 4))


def test_structure_pooling_is_restricted_to_the_region_and_falls_back(caplog):
    pooling = StructurePooling(
        8, num_queries=3, num_heads=2, generator=torch.Generator().manual_seed(0)
    )
    tokens = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(1))
    region = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]).bool()
    with caplog.at_level(logging.WARNING):
        pooled, weights = pooling(tokens, region)
    assert "1 of 3 images have an empty region" in caplog.text
    assert torch.all(weights[:2][~region[:2].unsqueeze(1).expand(2, 3, 6)] == 0)
    changed = tokens.clone()
    changed[0, 2:] = 50.0
    assert torch.allclose(pooling(changed, region)[0][0], pooled[0], atol=1e-6)
    all_patches, _ = pooling(tokens[2:], None)
    assert torch.allclose(pooled[2], all_patches[0], atol=1e-6)
    one_by_one = torch.cat([pooling(tokens[i : i + 1], region[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(one_by_one, pooled, atol=1e-6)
    # a single patch: identity value/output projections give back that patch token
    assert torch.allclose(pooled[1], tokens[1, 5], atol=1e-5)
    filled, empty = fill_empty_regions(region)
    assert empty.tolist() == [False, False, True] and filled[2].all()


@pytest.fixture(scope="module")
def lora_model():
    bundle = build_clip(get_cfg_defaults().MODEL)
    config = get_cfg_defaults().LORA
    config.ENCODER = "both"
    apply_lora(bundle.model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in bundle.model.named_parameters():
            if ".lora_B." in name:  # non-zero deltas: the LoRA path really runs
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return bundle


def test_image_tokens_pool_like_encode_image_with_lora(lora_model):
    model = lora_model.model
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pooled, tokens = encode_image_tokens(model, images)
        assert torch.allclose(pooled, model.encode_image(images), atol=1e-6)
        projected = project_image_tokens(model, tokens)
    assert tokens.shape == (2, 64, 64) and not model.visual.output_tokens
    assert torch.allclose(projected, tokens @ model.visual.proj)


def test_text_tokens_pool_like_encode_text_and_mark_the_words(lora_model):
    model = lora_model.model
    text = lora_model.tokenizer(["tumor", "normal squamous cells"])
    with torch.no_grad():
        pooled, words, valid = encode_text_tokens(model, text)
        assert torch.allclose(pooled, model.encode_text(text), atol=1e-6)
    end = text.argmax(dim=1)
    assert torch.allclose(words[torch.arange(2), end], pooled, atol=1e-6)
    assert valid[0, : end[0] + 2].tolist() == [False] + [True] * int(end[0]) + [False]
    assert valid.sum(dim=1).tolist() == end.tolist()
