"""Multi-view inference (AMLPF-CLIP): logits averaged over fixed crops and the full image.

logits = (mean_j L(crop_j) + L(full)) / 2, with the crops at deterministic positions (a regular
grid over the image), each resized back to the model's input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode


def multiview_config_node() -> CfgNode:
    """The MULTIVIEW node of a trainer that offers multi-view inference."""
    node = CfgNode()
    node.CROPS = 0  # number of crops averaged with the full image at evaluation; 0 = off
    node.CROP_FRACTION = 0.5  # crop side as a fraction of the image side
    return node


def compute_crop_boxes(size: int, num_crops: int, fraction: float) -> list[tuple[int, int, int]]:
    """(top, left, side) of `num_crops` square crops of side round(fraction * size).

    The crops are taken from a k x k grid of evenly spaced positions (k = ceil(sqrt(n))),
    choosing n grid cells evenly in row-major order: n = 1 is the centre crop, n = 4 the four
    corners, n = 5 the corners and the centre.
    """
    if num_crops < 1 or not 0 < fraction <= 1:
        raise ValueError(
            f"multi-view needs CROPS >= 1 and 0 < CROP_FRACTION <= 1 (got {num_crops}, {fraction})"
        )
    side = max(1, round(fraction * size))
    grid = math.ceil(math.sqrt(num_crops))
    if grid == 1:
        offsets = [(size - side) // 2]
    else:
        offsets = [round(value) for value in np.linspace(0, size - side, grid)]
    cells = [(top, left) for top in offsets for left in offsets]
    chosen = np.round(np.linspace(0, len(cells) - 1, num_crops)).astype(int)
    return [(*cells[index], side) for index in chosen]


def compute_multiview_logits(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    num_crops: int,
    fraction: float,
) -> torch.Tensor:
    """(B, C) logits (mean over crops + full image) / 2 for square normalised images (B, 3, S, S).

    One forward per crop (memory stays that of one batch).
    """
    size = images.shape[-1]
    crop_logits = [
        compute_logits(
            F.interpolate(
                images[:, :, top : top + side, left : left + side],
                size=(size, size),
                mode="bilinear",
                align_corners=False,
            )
        )
        for top, left, side in compute_crop_boxes(size, num_crops, fraction)
    ]
    return (torch.stack(crop_logits).mean(dim=0) + compute_logits(images)) / 2
