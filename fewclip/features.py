"""Text and image features of a CLIP model, with on-disk caches for frozen encoders.

Frozen image features live in a row store aligned with the decoded-image store (one row per
image of the sweep), so a frozen encoder runs on each image once per sweep, whichever seed or
shot count asks first. Rows every seed may evaluate are encoded in fixed batches of the store's
order (the same batch composition whichever cell fills them, so cached features are
bit-identical to freshly computed ones); few-shot training rows are encoded one at a time.
Text features of a frozen text tower are cached by backbone identity and prompt texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from fewclip.images import ImageRows, iterate_image_batches, resize_rows, to_model_input
from fewclip.stores import FILLED, RowStore

LOGGER = logging.getLogger(__name__)
_TEXT_FEATURES: dict[str, torch.Tensor] = {}  # this process's text features, by cache key


def resolve_precision(device: torch.device, precision: str) -> str:
    """ "bf16" or "fp32": what PRECISION ("auto", "fp32", "bf16") means on `device`."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"PRECISION must be auto, fp32 or bf16, not {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU ("auto" or "bf16"), plain fp32 on CPU unless "bf16" is asked for."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_performance_options(model: nn.Module, perf: CfgNode | None) -> None:
    """cfg.PERF on a built model, in place (parameter names unchanged): channels_last conv
    weights, and `torch.compile` of the image tower (or of the whole model if it has none)."""
    if perf is None:
        return
    if perf.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    if perf.COMPILE:
        getattr(model, "visual", model).compile()


def compute_text_features(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts_per_class: Sequence[Sequence[str]],
    device: torch.device,
    unit_norm: bool = True,
) -> torch.Tensor:
    """Prompt-ensemble class embeddings: (C, D).

    Each class's texts are encoded, normalised, averaged and normalised again (CLIP's ensemble).
    `unit_norm` False: the plain mean of the raw text embeddings, never normalised (CLAP's
    prototypes, whose norm its penalty sees). Gradients flow when the caller has not disabled
    them (text LoRA trains through this).
    """
    flat = [text for texts in texts_per_class for text in texts]
    counts = [len(texts) for texts in texts_per_class]
    tokens = tokenizer(flat).to(device)
    features = model.encode_text(tokens).float()
    if unit_norm:
        features = F.normalize(features, dim=-1)
    means = torch.stack([chunk.mean(dim=0) for chunk in torch.split(features, counts)])
    return F.normalize(means, dim=-1) if unit_norm else means


def cached_text_features(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts_per_class: Sequence[Sequence[str]],
    device: torch.device,
    identity: str,
    cache_dir: str | Path | None,
    unit_norm: bool = True,
) -> torch.Tensor:
    """`compute_text_features` of a text tower that does not train: (C, D), no gradient.

    Computed once per (backbone identity, prompt texts, device type, unit norm or raw) in fp32,
    then kept in this process and under `cache_dir/features/`. Only for an unmodified text
    tower: the key sees the weights through `identity` (as loaded), not changes made to them
    afterwards.
    """
    device = torch.device(device)
    texts = json.dumps([list(texts) for texts in texts_per_class])
    kind = "text-v1" if unit_norm else "text-raw-mean-v1"
    key = compute_feature_key(identity, device.type, kind, texts)
    if key not in _TEXT_FEATURES:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            _TEXT_FEATURES[key] = load_or_compute_features(
                cache_dir,
                key,
                lambda: compute_text_features(
                    model, tokenizer, texts_per_class, device, unit_norm
                ).cpu(),
            )
    return _TEXT_FEATURES[key].to(device, copy=True)


def encode_image_array(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | ImageRows,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int,
    precision: str = "auto",
    channels_last: bool = False,
) -> torch.Tensor:
    """Run `encode` over uint8 (N, H, W, 3) images in batches -> (N, ...) float32 on CPU.

    Batches are read without a DataLoader (next batch prefetched, pinned on GPU) and encoded
    under inference mode; the result is an ordinary tensor (usable in autograd afterwards).
    """
    outputs = []
    for batch in iterate_image_batches(images, batch_size, device):
        with torch.inference_mode(), autocast_context(device, precision):
            inputs = to_model_input(batch, mean, std, device, channels_last)
            outputs.append(encode(inputs).float().cpu().numpy())
    return torch.from_numpy(np.concatenate(outputs)) if outputs else torch.zeros(0)


def compute_feature_key(*parts: str) -> str:
    """Cache key of a feature file: everything the features depend on, hashed."""
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:24]


def load_or_compute_features(
    cache_dir: str | Path | None, key: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Return cached features for `key`, or compute, store atomically and return them.

    The file (`<cache>/features/<key>.npz`, no pickle) holds the features, its own key and a
    CRC-32 of their bytes: a damaged or foreign file is reported in one line and rebuilt.
    """
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / "features" / f"{key}.npz"
    if path.exists():
        cached = read_feature_file(path, key)
        if cached is not None:
            return cached
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(features.numpy())
    checksum = np.uint32(zlib.crc32(array.tobytes()))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, features=array, key=np.array(key), checksum=checksum)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # a full disk must not leave the temporary behind
    return features


def read_feature_file(path: Path, key: str) -> torch.Tensor | None:
    """The features of a cache file, or None (with one warning) when it is damaged or foreign."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features, saved_key, checksum = data["features"], str(data["key"]), data["checksum"]
        if saved_key != key:
            problem = f"it holds the entry {saved_key!r}"
        elif zlib.crc32(np.ascontiguousarray(features).tobytes()) != int(checksum):
            problem = "checksum mismatch"
        else:
            return torch.from_numpy(features)
    except Exception as error:  # any unreadable content (bad zip, pickle, missing member)
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    LOGGER.warning("rebuilding damaged feature cache %s (%s)", path, problem)
    return None


def load_image_features(
    data: Any,
    encode_images: Callable[[np.ndarray | ImageRows], torch.Tensor],
    encoder_key: str,
    batch_size: int,
    cache_dir: str | Path | None,
) -> torch.Tensor:
    """(N, ...) features of an ImageSet's images from the per-image feature store.

    `encode_images(uint8 (n, H, W, 3)) -> (n, ...)` runs the frozen encoder; `encoder_key`
    names everything its output depends on besides the pixels (backbone identity, precision,
    device type, what is encoded). Without a cache (no `cache_dir`, or a set that is not rows of
    a decoded-image store) the features are computed directly.
    """
    store, rows = getattr(data, "store", None), getattr(data, "rows", None)
    if not cache_dir or store is None or rows is None or store.rows is None:
        images = data.images  # an in-memory training set is at the stored size: view it
        if store is not None and images.shape[1] != store.image_size:
            images = resize_rows(np.asarray(images), store.image_size)
        return encode_images(images)
    features = RowStore(
        Path(cache_dir) / "features",
        # input_key: the stored pixels and, when STORE_SIZE > input, their resize to the input
        compute_feature_key(store.input_key, encoder_key, f"batch={batch_size}", "rows-v1"),
        len(store.items),
        np.float32,
    )
    eager = store.eager
    chunks = [eager[start : start + batch_size] for start in range(0, len(eager), batch_size)]
    chunks += [np.array([row]) for row in np.setdiff1d(rows, eager)]

    def compute(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = store.read(chunk)  # the model-input view; unreadable images are zeros here,
        # and FAILED below
        return encode_images(pixels).numpy(), store.rows.states(chunk) == FILLED

    features.fill(chunks, compute)
    return torch.from_numpy(features.read(rows))
