"""build_clip (tiny, checkpoint file, tag, hub cache) and split attention on the tiny CLIP."""

from __future__ import annotations

import json
import socket

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fewclip.attention import SplitAttention, split_attention
from fewclip.backbones import INIT_SEED, TINY_CONFIGS, build_clip
from fewclip.config import get_cfg_defaults

IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
TEXTS = ["a histopathology image of tumor.", "normal", "a much longer description " * 3]


def model_cfg(**values):
    cfg = get_cfg_defaults().MODEL
    for key, value in values.items():
        cfg[key] = value
    return cfg


def encode(bundle_or_model, tokenizer=None):
    model = getattr(bundle_or_model, "model", bundle_or_model)
    tokenizer = tokenizer or bundle_or_model.tokenizer
    with torch.no_grad():
        return model.encode_image(IMAGES), model.encode_text(tokenizer(TEXTS))


def assert_same_outputs(first, second, tolerance=1e-5):
    for a, b in zip(first, second):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= tolerance


def raw_tiny_clip() -> nn.Module:
    """The tiny architecture as open_clip builds it: fused nn.MultiheadAttention, seeded."""
    torch.manual_seed(INIT_SEED)
    return open_clip.CLIP(**TINY_CONFIGS["tiny-vit"]).eval()


def test_tiny_bundle_is_seeded_frozen_split_and_normalised_like_clip():
    first, second = build_clip(model_cfg()), build_clip(model_cfg())
    assert first.image_size == 64
    assert first.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert first.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert first.identity == second.identity == f"tiny-vit:random-init(seed={INIT_SEED})"
    assert not first.model.training
    assert not any(parameter.requires_grad for parameter in first.model.parameters())
    modules = list(first.model.modules())
    assert not any(isinstance(module, nn.MultiheadAttention) for module in modules)
    assert sum(isinstance(module, SplitAttention) for module in modules) == 4
    assert first.tokenizer(TEXTS).shape == (3, 77)
    image_features, text_features = encode(first)
    assert image_features.shape == (3, 64) and text_features.shape == (3, 64)
    assert_same_outputs(encode(first), encode(second), tolerance=0.0)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    build_clip(model_cfg())
    assert torch.rand(1) == expected  # building does not disturb the caller's RNG


def test_split_attention_keeps_encoder_outputs():
    model = raw_tiny_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    before = encode(model, tokenizer)
    assert split_attention(model) == 4
    assert split_attention(model) == 0
    assert_same_outputs(before, encode(model, tokenizer))
    attention = model.transformer.resblocks[0].attn
    assert all(
        isinstance(getattr(attention, name), nn.Linear)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    )


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_matches_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitAttention(reference).eval()
    batch, length = 3, 5
    x = torch.randn(batch, length, 16) if batch_first else torch.randn(length, batch, 16)
    causal = torch.full((length, length), float("-inf")).triu(1)
    blocked = torch.rand(length, length) > 0.6
    blocked.fill_diagonal_(False)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    per_head = torch.randn(batch * 4, length, length)
    cases = [
        {},
        {"attn_mask": causal},
        {"attn_mask": blocked},
        {"key_padding_mask": padding},
        {"attn_mask": per_head, "key_padding_mask": padding.float() * -1e9},
    ]
    for case in cases:
        for need_weights in (False, True):
            expected = reference(x, x, x, need_weights=need_weights, **case)
            actual = split(x, x, x, need_weights=need_weights, **case)
            assert (expected[0] - actual[0]).abs().max() < 1e-5, case
            if need_weights:
                assert (expected[1] - actual[1]).abs().max() < 1e-5, case
            else:
                assert actual[1] is None


def test_checkpoint_file_round_trip_in_any_wrapping(tmp_path):
    bundle = build_clip(model_cfg())
    with torch.no_grad():  # weights that differ from the seeded init
        for parameter in bundle.model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    expected = encode(bundle)
    split_state = bundle.model.state_dict()
    fused_model = raw_tiny_clip()
    fused_model.load_state_dict(_fuse(split_state))
    files = {
        "plain.pt": split_state,
        "wrapped.pt": {
            "state_dict": {"module." + key: value for key, value in split_state.items()}
        },
        "fused.bin": fused_model.state_dict(),  # open_clip's own layout (in_proj_weight)
    }
    for filename, content in files.items():
        torch.save(content, tmp_path / filename)
        loaded = build_clip(model_cfg(PRETRAINED=str(tmp_path / filename)))
        assert_same_outputs(expected, encode(loaded))
        assert loaded.identity.startswith("tiny-vit:file-sha1=")
    assert build_clip(model_cfg(PRETRAINED=str(tmp_path / "plain.pt"))).identity != loaded.identity


def _fuse(split_state):
    fused = {}
    for key, value in split_state.items():
        if ".attn.q_proj." in key:
            prefix, kind = key.split(".attn.q_proj.")
            parts = [split_state[f"{prefix}.attn.{name}_proj.{kind}"] for name in "qkv"]
            fused[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            fused[key] = value
    return fused


def test_missing_and_mismatched_checkpoints_fail_in_one_line(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        build_clip(model_cfg(PRETRAINED=str(missing)))
    other = dict(TINY_CONFIGS["tiny-vit"], embed_dim=32)
    torch.save(open_clip.CLIP(**other).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"does not fit this architecture: shape") as error:
        build_clip(model_cfg(PRETRAINED=str(tmp_path / "other.pt")))
    assert "\n" not in str(error.value) and "text_projection" in str(error.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        build_clip(model_cfg(PRETRAINED=str(tmp_path / "garbage.pt")))
    with pytest.raises(ValueError, match="not-a-model"):
        build_clip(model_cfg(NAME="not-a-model"))
    with pytest.raises(ValueError, match="no-such-tag"):
        build_clip(model_cfg(NAME="ViT-B-16", PRETRAINED="no-such-tag"))


def test_uncached_tag_and_hub_id_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    connections = []  # fast = no network attempt at all (a miss online retries for ~45 s)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connections.append(a))
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connections.append(a))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download timm/vit_base_patch16"):
        build_clip(model_cfg(NAME="ViT-B-16", PRETRAINED="openai"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download microsoft/BiomedCLIP"):
        build_clip(
            model_cfg(HF_HUB="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
        )
    assert connections == []
    with pytest.raises(ValueError, match="hf-hub:org/name"):
        build_clip(model_cfg(HF_HUB="microsoft/BiomedCLIP"))


def test_hub_model_loads_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--lab--tiny-clip"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"model_cfg": TINY_CONFIGS["tiny-vit"], "preprocess_cfg": preprocess}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    model = raw_tiny_clip()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(snapshot / "open_clip_model.safetensors"),
    )
    bundle = build_clip(model_cfg(HF_HUB="hf-hub:lab/tiny-clip"))
    assert bundle.identity == "hf-hub:lab/tiny-clip@0123abcd"
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.25, 0.25, 0.25)
    assert_same_outputs(encode(model, bundle.tokenizer), encode(bundle))
