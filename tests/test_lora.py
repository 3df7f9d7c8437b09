"""LoRA selection, freezing, adapter files and merging on the tiny CLIP."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from fewclip.backbones import build_clip
from fewclip.config import get_cfg_defaults
from fewclip.lora import apply_lora, load_adapter, lora_state_dict, merge_lora, save_adapter

IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
TEXTS = ["a histopathology image of tumor.", "normal cervix"]


def lora_cfg(**values):
    cfg = get_cfg_defaults().LORA
    for key, value in values.items():
        cfg[key] = value
    return cfg


def tiny():
    return build_clip(get_cfg_defaults().MODEL)


def encode(bundle):
    with torch.no_grad():
        return bundle.model.encode_image(IMAGES), bundle.model.encode_text(bundle.tokenizer(TEXTS))


def max_difference(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def randomise_lora_b(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_injected_model_starts_identical_and_trains_only_selected_lora():
    bundle = tiny()
    before = encode(bundle)
    config = lora_cfg(ENCODER="vision", LAYERS=[1], TARGETS=["q", "mlp"], RANK=4)
    names = apply_lora(bundle.model, config)
    block = "visual.transformer.resblocks.1"
    expected = {
        f"{block}.{module}.lora_{side}.default.weight"
        for module in ("attn.q_proj", "mlp.c_fc", "mlp.c_proj")
        for side in "AB"
    }
    assert set(names) == expected
    trainable = {name for name, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert bundle.model.get_submodule(f"{block}.attn.q_proj").lora_A["default"].weight.shape == (
        4,
        64,
    )
    assert max_difference(before, encode(bundle)) == 0.0


def test_top_k_and_both_encoders_with_text_rank():
    bundle = tiny()
    names = apply_lora(bundle.model, lora_cfg(ENCODER="both", TOP_K=1, TARGETS=["v"], TEXT_RANK=3))
    assert sorted(names) == sorted(
        f"{prefix}.1.attn.v_proj.lora_{side}.default.weight"
        for prefix in ("visual.transformer.resblocks", "transformer.resblocks")
        for side in "AB"
    )
    shapes = {name: tuple(p.shape) for name, p in bundle.model.named_parameters() if name in names}
    assert shapes["visual.transformer.resblocks.1.attn.v_proj.lora_A.default.weight"] == (2, 64)
    assert shapes["transformer.resblocks.1.attn.v_proj.lora_A.default.weight"] == (3, 64)


def test_vision_lora_leaves_text_encoder_untouched():
    bundle = tiny()
    before = encode(bundle)
    names = apply_lora(
        bundle.model, lora_cfg(ENCODER="vision", TARGETS=["q", "k", "v", "out", "mlp"])
    )
    assert len(names) == 2 * 2 * 6 and all(name.startswith("visual.") for name in names)
    assert not any(isinstance(module, LoraLayer) for module in bundle.model.transformer.modules())
    randomise_lora_b(bundle.model)
    image_features, text_features = encode(bundle)
    assert torch.equal(text_features, before[1])
    assert (image_features - before[0]).abs().max() > 1e-3


def test_adapter_round_trip_into_fresh_models(tmp_path):
    config = lora_cfg(ENCODER="both", LAYERS=[0], TARGETS=["q", "out"], RANK=2, TEXT_RANK=4)
    bundle = tiny()
    apply_lora(bundle.model, config)
    randomise_lora_b(bundle.model)
    expected = encode(bundle)
    path = tmp_path / "adapter" / "lora.safetensors"
    save_adapter(bundle.model, path)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(lora_state_dict(bundle.model))
        saved_config = json.loads(handle.metadata()["fewclip_lora_config"])
    assert saved_config["ENCODER"] == "both" and saved_config["TEXT_RANK"] == 4

    configured = tiny()  # LoRA injected by the caller, then loaded
    apply_lora(configured.model, config)
    load_adapter(configured.model, path)
    assert max_difference(expected, encode(configured)) == 0.0

    bare = tiny()  # no LoRA yet: injected from the file's metadata
    load_adapter(bare.model, path)
    assert max_difference(expected, encode(bare)) == 0.0

    other = tiny()
    apply_lora(other.model, lora_cfg(ENCODER="vision", LAYERS=[1]))
    with pytest.raises(ValueError, match="missing .*resblocks.1"):
        load_adapter(other.model, path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_adapter(other.model, tmp_path / "absent.safetensors")


def test_merge_folds_deltas_into_plain_linears():
    bundle = tiny()
    apply_lora(
        bundle.model, lora_cfg(ENCODER="both", TARGETS=["q", "k", "v", "out", "mlp"], ALPHA=4.0)
    )
    randomise_lora_b(bundle.model)
    with_lora = encode(bundle)
    assert max_difference(with_lora, encode(tiny())) > 1e-3
    merge_lora(bundle.model)
    assert not any(isinstance(module, LoraLayer) for module in bundle.model.modules())
    assert set(bundle.model.state_dict()) == set(tiny().model.state_dict())
    assert type(bundle.model.visual.transformer.resblocks[0].attn.q_proj) is torch.nn.Linear
    assert max_difference(with_lora, encode(bundle)) < 1e-5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ENCODER": "audio"}, "ENCODER 'audio'.*vision, text, both"),
        ({"TARGETS": ["q", "qkv"]}, "qkv.*q, k, v, out, mlp"),
        ({"LAYERS": [0, 2]}, r"LAYERS \[2\] out of range .*0\.\.1"),
        ({"TOP_K": 3}, "TOP_K 3 exceeds"),
        ({"RANK": 0}, "RANK must be >= 1"),
    ],
)
def test_bad_lora_config_values_raise(values, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny().model, lora_cfg(**values))
