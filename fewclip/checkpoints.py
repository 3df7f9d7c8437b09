"""Reading CLIP checkpoints: state dicts of every format, fused attention keys converted, and a
strict load whose error names the mismatched keys (another family or size)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _file_sha1(path: Path, chunk_size: int = 1 << 24) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return f"{digest.hexdigest()}:size={path.stat().st_size}"


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a full CLIP checkpoint into a model whose attention is split; strict on keys/shapes.

    Accepts open_clip/OpenAI state dicts (.pt/.bin/.pth, TorchScript, .safetensors), wrapped in
    {"state_dict": ...} and/or with "module." prefixes, with fused or split attention weights.
    """
    path = Path(path)
    expected = model.state_dict()
    state = split_fused_attention(read_state_dict(path), expected)
    problems = describe_state_mismatch(state, expected)
    if problems:
        raise ValueError(f"checkpoint {path} does not fit this architecture: {problems}")
    model.load_state_dict(state, strict=True)


def describe_state_mismatch(state: dict, expected: dict) -> str:
    """'' when `state` fits `expected`, else the first missing, unexpected, mis-shaped keys."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", wrong_shape),
        )
        if keys
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path), device="cpu")
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError:  # OpenAI's TorchScript archives
                checkpoint = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read checkpoint {path}: {message}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"checkpoint {path} holds no state dict ({type(checkpoint).__name__})")
    for key in ("input_resolution", "context_length", "vocab_size"):  # TorchScript extras
        checkpoint.pop(key, None)
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def split_fused_attention(
    state: dict[str, torch.Tensor], expected: dict | None = None
) -> dict[str, torch.Tensor]:
    """`*.in_proj_weight/bias` (q, k, v stacked) -> `*.q_proj.weight`, `*.k_proj.weight`, ...;
    timm's fused `*.qkv.weight/bias` likewise, where `expected` (the model's state) is split."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        kind = "weight" if leaf.endswith("weight") else "bias"
        fused_mha = leaf in ("in_proj_weight", "in_proj_bias")
        fused_timm = (
            prefix.endswith(".qkv")
            and expected is not None
            and f"{prefix[: -len('.qkv')]}.q_proj.{kind}" in expected
        )
        if (fused_mha or fused_timm) and value.shape[0] % 3 == 0:
            base = prefix if fused_mha else prefix[: -len(".qkv")]
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                converted[f"{base}.{part}_proj.{kind}"] = chunk.clone()
        else:
            converted[key] = value
    return converted
