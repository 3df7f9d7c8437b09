"""Text and image features of a CLIP model, with an on-disk cache for frozen encoders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewclip.images import to_model_input


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU ("auto" or "bf16"), plain fp32 on CPU unless "bf16" is asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_text_features(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts_per_class: Sequence[Sequence[str]],
    device: torch.device,
) -> torch.Tensor:
    """Prompt-ensemble class embeddings: (C, D), unit norm.

    Each class's texts are encoded, normalised, averaged and normalised again (CLIP's ensemble).
    Gradients flow when the caller has not disabled them (text LoRA trains through this).
    """
    flat = [text for texts in texts_per_class for text in texts]
    counts = [len(texts) for texts in texts_per_class]
    tokens = tokenizer(flat).to(device)
    features = F.normalize(model.encode_text(tokens).float(), dim=-1)
    per_class = torch.split(features, counts)
    return F.normalize(torch.stack([chunk.mean(dim=0) for chunk in per_class]), dim=-1)


@torch.inference_mode()
def encode_image_array(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
    precision: str = "auto",
) -> torch.Tensor:
    """Run `encode` over uint8 (N, H, W, 3) images in batches -> (N, ...) float32 on CPU."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], mean, std, device)
        with autocast_context(device, precision):
            outputs.append(encode(batch).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def compute_feature_key(*parts: str) -> str:
    """Cache key of a feature file: everything the features depend on, hashed."""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:24]


def load_or_compute_features(
    cache_dir: str | Path | None, key: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Return cached features for `key`, or compute, store atomically and return them."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / "features" / f"{key}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy.tmp", delete=False) as handle:
        np.save(handle, features.numpy())
    os.replace(handle.name, path)
    return features
