"""Structure-aware pooling (SAVLT): attention pooling with learned queries over patch tokens,
restricted to a region of interest (ROI) on the patch grid.

The ROI of an image comes from its mask file (`Item.mask`, resized like the image, then to the
patch grid) when the dataset has one, else from a rule computed on the pixels (`ROI_RULES`). An
empty ROI falls back to all patches with a logged warning. Everything is batched: the ROI enters
the attention as a key padding mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fewclip.data import Item, load_image
from fewclip.images import resize_center_crop

LOGGER = logging.getLogger(__name__)


class StructurePooling(nn.Module):
    """Multi-head attention of `num_queries` learned queries over the ROI's patch tokens.

    The value and output projections start as the identity, so the initial output is an
    attention-weighted mean of the patch tokens: it stays in the tokens' space (the space the
    visual projection expects). Output (B, W) = mean over the queries.
    """

    def __init__(
        self,
        width: int,
        num_queries: int,
        num_heads: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_queries < 1 or num_heads < 1 or width % num_heads:
            raise ValueError(
                f"StructurePooling: need queries >= 1 and heads dividing the width {width} "
                f"(got {num_queries} queries, {num_heads} heads)"
            )
        self.queries = nn.Parameter(
            torch.randn(num_queries, width, generator=generator) * width**-0.5
        )
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        with torch.no_grad():
            self.attention.in_proj_weight[2 * width :].copy_(torch.eye(width))
            self.attention.out_proj.weight.copy_(torch.eye(width))
            self.attention.in_proj_bias.zero_()
            self.attention.out_proj.bias.zero_()

    def forward(
        self, tokens: torch.Tensor, region: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, W), region (B, N) bool (True = in the ROI) or None (all patches).

        Returns pooled (B, W) and attention weights (B, Q, N), zero outside the region.
        """
        batch = tokens.shape[0]
        queries = self.queries.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
        padding = None
        if region is not None:
            region, empty = fill_empty_regions(region)
            if bool(empty.any()):
                LOGGER.warning(
                    "%d of %d images have an empty region of interest; using all their patches",
                    int(empty.sum()),
                    batch,
                )
            padding = ~region
        pooled, weights = self.attention(queries, tokens, tokens, key_padding_mask=padding)
        return pooled.mean(dim=1), weights


def fill_empty_regions(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """region (B, N) bool -> the same with empty rows set to all True, and which rows were empty."""
    empty = ~region.any(dim=1)
    return region | empty.unsqueeze(1), empty


def compute_patch_intensity(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    grid: tuple[int, int],
) -> torch.Tensor:
    """(B, 3, H, W) CLIP-normalised images -> (B, rows, columns) mean grey level in [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.float() * std_t + mean_t).clamp(0, 1).mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(pixels, grid).squeeze(1)


def compute_surface_region(
    intensity: torch.Tensor, threshold: float, depth: int = 0
) -> torch.Tensor:
    """Patches at and below the tissue surface of each column (OCT B-scans: air on top is dark).

    intensity (B, rows, columns) is rescaled per image to [0, 1] (min..max); the surface of a
    column is its first row (from the top) at or above `threshold`. depth > 0 keeps only `depth`
    rows from the surface down. A column that never reaches the threshold has no ROI; a flat
    image has none at all. Returns (B, rows, columns) bool.
    """
    flat = intensity.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    spread = (flat.max(dim=1).values.view(-1, 1, 1) - low).clamp_min(1e-8)
    scaled = (intensity - low) / spread
    reached = (scaled >= threshold).int().cumsum(dim=1) > 0  # at or below the first bright row
    if depth > 0:
        reached = reached & (reached.int().cumsum(dim=1) <= depth)
    flat_image = (intensity.amax(dim=(1, 2)) - intensity.amin(dim=(1, 2))) <= 1e-8
    return reached & ~flat_image.view(-1, 1, 1)


ROI_RULES = ("below_surface", "all")


def compute_rule_region(
    images: torch.Tensor,
    rule: str,
    mean: Sequence[float],
    std: Sequence[float],
    grid: tuple[int, int],
    threshold: float = 0.5,
    depth: int = 0,
) -> torch.Tensor:
    """(B, N) bool ROI from a rule on the pixels: "below_surface" or "all" (every patch)."""
    if rule == "all":
        return torch.ones(
            images.shape[0], grid[0] * grid[1], dtype=torch.bool, device=images.device
        )
    if rule == "below_surface":
        intensity = compute_patch_intensity(images, mean, std, grid)
        return compute_surface_region(intensity, threshold, depth).flatten(1)
    raise ValueError(f"unknown region rule {rule!r}; choose one of {', '.join(ROI_RULES)}")


def load_region_mask(path: str, image_size: int, grid: tuple[int, int]) -> np.ndarray:
    """A mask file -> (rows * columns,) bool: patches at least half inside the mask.

    Any non-zero pixel is inside. The mask is resized and center-cropped like the images.
    """
    grey = np.asarray(load_image(path).convert("L")) > 0
    binary = Image.fromarray(grey.astype(np.uint8) * 255, mode="L")
    resized = torch.from_numpy(resize_center_crop(binary, image_size) > 127).float()
    fraction = F.adaptive_avg_pool2d(resized[None, None], grid)[0, 0]
    return (fraction >= 0.5).flatten().numpy()


def load_region_masks(
    items: Sequence[Item], image_size: int, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of `items` on the patch grid: (N, rows * columns) bool and has_mask (N,) bool.

    Items without a mask get an all-False row and has_mask False. A mask that cannot be read
    raises `ImageError` naming the file.
    """
    size = grid[0] * grid[1]
    masks = np.zeros((len(items), size), dtype=bool)
    has_mask = np.zeros(len(items), dtype=bool)
    for index, item in enumerate(items):
        if item.mask:
            masks[index] = load_region_mask(item.mask, image_size, grid)
            has_mask[index] = True
    return torch.from_numpy(masks), torch.from_numpy(has_mask)
