"""Training augmentation on batches of model inputs: random resized crop and horizontal flip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fewclip.config import CHOICES

CROP_INTERPOLATIONS = CHOICES["INPUT.CROP_INTERPOLATION"]


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: Sequence[float] = (0.5, 1.0),
    output_size: int | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Random resized crop (area in `scale`, aspect 3/4..4/3) and horizontal flip, batched.

    images: (B, 3, H, W) float -> (B, 3, s, s) with s = `output_size` (None: H x W kept), so a
    crop of a stored image larger than the model input is sampled at the input size. The crops
    are one batched affine grid sample: no per-sample Python loop over pixels. `interpolation`
    is its resampling ("bicubic" = torchvision's InterpolationMode.BICUBIC, as CLIP-LoRA trains).
    """
    if interpolation not in CROP_INTERPOLATIONS:
        raise ValueError(
            f"INPUT.CROP_INTERPOLATION {interpolation!r} is not one of "
            f"{', '.join(CROP_INTERPOLATIONS)}"
        )
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
    shape = list(images.shape[:2]) + ([output_size] * 2 if output_size else list(images.shape[2:]))
    grid = F.affine_grid(theta.to(images), shape, align_corners=False)
    return F.grid_sample(
        images, grid, mode=interpolation, padding_mode="reflection", align_corners=False
    )
