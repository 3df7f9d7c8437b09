"""Decoded-image store: images decoded and resized once, as uint8, shared by every run of a sweep.

Evaluation images go to a memory-mapped `.npy` under CACHE_DIR keyed by everything the pixels
depend on (paths, sizes, modification times, the resize recipe), so a stale entry is never read.
Training batches are drawn from the same uint8 arrays held in memory and augmented as tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewclip.data import ImageError, Item, load_image

LOGGER = logging.getLogger(__name__)
RESIZE_RECIPE = "short-side-bicubic+center-crop+v1"


def compute_image_key(items: Sequence[Item], image_size: int) -> str:
    """Hash of the file list (path, size, mtime) and the resize recipe: the cache entry's name."""
    digest = hashlib.sha1(f"{RESIZE_RECIPE}:{image_size}".encode())
    for item in items:
        try:
            stat = os.stat(item.path)
            digest.update(f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{item.path}\0missing\n".encode())
    return digest.hexdigest()[:20]


def resize_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """Deterministic evaluation transform: bicubic short-side resize, center crop -> HWC uint8."""
    width, height = image.size
    scale = image_size / min(width, height)
    new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - image_size) // 2
    top = (new_size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def decode_items(
    items: Sequence[Item], image_size: int, skip_unreadable: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Decode and resize `items` -> (N', H, W, 3) uint8 and the indices kept."""
    arrays, kept = [], []
    for index, item in enumerate(items):
        try:
            arrays.append(resize_center_crop(load_image(item.path), image_size))
        except ImageError:
            if not skip_unreadable:
                raise
            LOGGER.warning("skipping unreadable image %s", item.path)
            continue
        kept.append(index)
    if not arrays:
        return np.zeros((0, image_size, image_size, 3), np.uint8), kept
    return np.stack(arrays), kept


def load_image_array(
    items: Sequence[Item],
    image_size: int,
    cache_dir: str | Path | None,
    skip_unreadable: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """Decoded uint8 images for `items`, read from (or written once to) the on-disk cache.

    Returns a read-only memory map when cached. Concurrent writers each write a temporary file
    and atomically rename it; the loser's identical file simply replaces the winner's.
    """
    if cache_dir is None:
        return decode_items(items, image_size, skip_unreadable)
    folder = Path(cache_dir) / "images"
    key = compute_image_key(items, image_size)
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        kept = json.loads(meta_path.read_text())["kept"]
        return np.load(array_path, mmap_mode="r"), kept
    array, kept = decode_items(items, image_size, skip_unreadable)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic_bytes(meta_path, json.dumps({"kept": kept, "count": len(items)}).encode(), folder)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy.tmp", delete=False) as handle:
        np.save(handle, array)
    os.replace(handle.name, array_path)
    return np.load(array_path, mmap_mode="r"), kept


def write_atomic_bytes(path: Path, data: bytes, folder: Path | None = None) -> None:
    """Write a temporary file in the same folder, then os.replace: never half a file."""
    folder = folder or path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def to_model_input(
    batch: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised with CLIP's mean and std."""
    tensor = torch.as_tensor(np.asarray(batch)) if not isinstance(batch, torch.Tensor) else batch
    tensor = tensor.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t


def augment_batch(
    images: torch.Tensor, generator: torch.Generator, scale: Sequence[float] = (0.5, 1.0)
) -> torch.Tensor:
    """Random resized crop (area in `scale`, aspect 3/4..4/3) and horizontal flip, batched.

    images: (B, 3, H, W) float. The crops are done as one batched affine grid sample, so the
    cost does not grow with a per-sample Python loop over pixels.
    """
    batch = images.shape[0]
    area = torch.empty(batch).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch).uniform_(np.log(3 / 4), np.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    center_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - width)
    center_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
