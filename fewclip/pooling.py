"""Structure-aware pooling (SAVLT): attention pooling over the patch tokens of a region of
interest (ROI) on the patch grid.

Two poolings: `ChannelGroupPooling`, the released code's (one learned query per channel group,
no projections, then a Linear(W, W)), and `StructurePooling`, fewclip's multi-head attention with
learned projections and several queries (option `projected`).

The ROI of an image comes from its tissue mask file (`Item.mask`, resized like the image), turned
into patches by a rule in `ROIS`: "box" (the released code: the patches inside the box from the
first fully-tissue row at or below 10 % of the height down to the bottom) or "mask" (the patches
at least half inside the mask). Images without a mask use a rule on the pixels (`ROI_RULES`). An
empty ROI falls back to all patches with a logged warning. Everything is batched: the ROI enters
the attention as a key padding mask.
"""

from __future__ import annotations

import logging
import math
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
    """fewclip's option `projected`: multi-head attention of `num_queries` learned queries
    over the ROI's patch tokens, with learned q/k/v/out projections (4 W^2 + 4 W parameters).

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
        padding = None if region is None else ~_fill_and_warn(region)
        pooled, weights = self.attention(queries, tokens, tokens, key_padding_mask=padding)
        return pooled.mean(dim=1), weights


def compute_channel_group_attention(
    tokens: torch.Tensor, queries: torch.Tensor, region: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAVLT's per-head query attention without projections (rabbit-my/SAVLT model.py:212-227).

    tokens (B, N, W) are split into H channel groups t_i^h (d = W / H channels each); queries
    (H, d), one per group. a_h = softmax over the ROI's patches i of <q_h, t_i^h> / sqrt(d);
    head h gives sum_i a_{h,i} t_i^h (d,); the heads are concatenated in order -> (B, W).
    region (B, N) bool (True = in the ROI, no empty rows) or None (all patches).
    Returns pooled (B, W) and the weights (B, H, N), zero outside the region.
    """
    batch, count, width = tokens.shape
    heads, head_dim = queries.shape
    grouped = tokens.view(batch, count, heads, head_dim)
    scores = torch.einsum("bnhd,hd->bhn", grouped, queries.to(tokens.dtype)) / math.sqrt(head_dim)
    if region is not None:
        scores = scores.masked_fill(~region.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    pooled = torch.einsum("bhn,bnhd->bhd", weights, grouped).reshape(batch, width)
    return pooled, weights


class ChannelGroupPooling(nn.Module):
    """The released SAVLT pooling (rabbit-my/SAVLT model.py:142-237, `ROIAttentionExtractor`):
    one learned query per channel group (H groups, xavier-uniform init of the (1, H, d) tensor,
    model.py:153-154), `compute_channel_group_attention` over the ROI, then `output`, a
    Linear(W, W) (model.py:156, 229). The caller applies the visual projection and L2 norm.

    Parameters: W (queries) + W * W + W (output) = 591,360 at W = 768 (0.59 M).
    """

    def __init__(
        self, width: int, num_heads: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if num_heads < 1 or width % num_heads:
            raise ValueError(
                f"ChannelGroupPooling: need heads >= 1 dividing the width {width} "
                f"(got {num_heads} heads)"
            )
        self.queries = nn.Parameter(torch.empty(1, num_heads, width // num_heads))
        nn.init.xavier_uniform_(self.queries, generator=generator)
        self.output = nn.Linear(width, width)
        # nn.Linear's own initialisation, drawn from `generator` (reproducible per seed)
        nn.init.kaiming_uniform_(self.output.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(width)
        nn.init.uniform_(self.output.bias, -bound, bound, generator=generator)

    def forward(
        self, tokens: torch.Tensor, region: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, W), region (B, N) bool or None -> output(pooled) (B, W), weights
        (B, H, N)."""
        if region is not None:
            region = _fill_and_warn(region)
        pooled, weights = compute_channel_group_attention(tokens, self.queries[0], region)
        return self.output(pooled), weights


def _fill_and_warn(region: torch.Tensor) -> torch.Tensor:
    region, empty = fill_empty_regions(region)
    if bool(empty.any()):
        LOGGER.warning(
            "%d of %d images have an empty region of interest; using all their patches",
            int(empty.sum()),
            region.shape[0],
        )
    return region


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


ROIS = ("box", "mask")


def compute_box_region(
    tissue: torch.Tensor, grid: tuple[int, int], min_row_ratio: float = 0.1
) -> torch.Tensor:
    """The released SAVLT ROI of a tissue mask (rabbit-my/SAVLT get_roi.py:24-31, model.py:187-207).

    tissue (B, H, W) bool at the model input's resolution. y = the first pixel row at or below
    int(H * min_row_ratio) whose every pixel is tissue; the box is (0, y / H, 1, 1), and a patch
    is kept when it lies wholly inside it: patch row r with r * H >= y * rows (every column).
    An image without such a row has an empty ROI (the source fails there). Returns (B, N) bool.
    """
    batch, height, _ = tissue.shape
    rows, columns = grid
    full = tissue.all(dim=2)  # (B, H): rows that are tissue from edge to edge
    full[:, : int(height * min_row_ratio)] = False
    found = full.any(dim=1)
    top = full.int().argmax(dim=1)  # the first such row (0 when none; masked by `found`)
    patch_rows = torch.arange(rows, device=tissue.device)
    keep = (patch_rows.unsqueeze(0) * height >= top.unsqueeze(1) * rows) & found.unsqueeze(1)
    return keep.unsqueeze(2).expand(batch, rows, columns).reshape(batch, rows * columns)


def compute_mask_region(tissue: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """fewclip's ROI "mask": (B, H, W) mask (bool or float in [0, 1]) -> (B, N) bool, the
    patches at least half inside the mask."""
    fraction = F.adaptive_avg_pool2d(tissue.float().unsqueeze(1), grid).squeeze(1)
    return (fraction >= 0.5).flatten(1)


def compute_roi(
    tissue: torch.Tensor, roi: str, grid: tuple[int, int], min_row_ratio: float = 0.1
) -> torch.Tensor:
    """(B, H, W) tissue masks -> (B, N) bool ROI by the rule `roi` ("box" or "mask")."""
    if roi == "box":
        return compute_box_region(
            tissue > 0.5 if tissue.is_floating_point() else tissue, grid, min_row_ratio
        )
    if roi == "mask":
        return compute_mask_region(tissue, grid)
    raise ValueError(f"unknown ROI {roi!r}; choose one of {', '.join(ROIS)}")


def load_pixel_mask(path: str, image_size: int) -> np.ndarray:
    """A mask file -> (image_size, image_size) bool, resized and center-cropped like the images.

    Any non-zero pixel is inside (tissue). A file that cannot be read raises `ImageError`.
    """
    grey = np.asarray(load_image(path).convert("L")) > 0
    binary = Image.fromarray(grey.astype(np.uint8) * 255, mode="L")
    return resize_center_crop(binary, image_size) > 127


def load_region_mask(path: str, image_size: int, grid: tuple[int, int]) -> np.ndarray:
    """A mask file -> (rows * columns,) bool by the "mask" rule: patches at least half inside."""
    pixels = torch.from_numpy(load_pixel_mask(path, image_size))
    return compute_mask_region(pixels.unsqueeze(0), grid)[0].numpy()


def load_pixel_masks(items: Sequence[Item], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of `items` at full resolution: (N, S, S) bool and has_mask (N,) bool (S =
    image_size). Items without a mask get an all-False mask and has_mask False."""
    masks = np.zeros((len(items), image_size, image_size), dtype=bool)
    has_mask = np.zeros(len(items), dtype=bool)
    for index, item in enumerate(items):
        if item.mask:
            masks[index] = load_pixel_mask(item.mask, image_size)
            has_mask[index] = True
    return torch.from_numpy(masks), torch.from_numpy(has_mask)


def load_region_masks(
    items: Sequence[Item],
    image_size: int,
    grid: tuple[int, int],
    roi: str = "mask",
    min_row_ratio: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROIs of `items` on the patch grid from their masks: (N, rows * columns) bool and has_mask
    (N,) bool. Each mask is read at full resolution, turned into patches by the rule `roi`
    (`compute_roi`) and dropped, so a large test set costs N x patches, not N x pixels.

    Items without a mask get an all-False row and has_mask False. A mask that cannot be read
    raises `ImageError` naming the file.
    """
    size = grid[0] * grid[1]
    masks = np.zeros((len(items), size), dtype=bool)
    has_mask = np.zeros(len(items), dtype=bool)
    for index, item in enumerate(items):
        if item.mask:
            pixels = torch.from_numpy(load_pixel_mask(item.mask, image_size)).unsqueeze(0)
            masks[index] = compute_roi(pixels, roi, grid, min_row_ratio)[0].numpy()
            has_mask[index] = True
    return torch.from_numpy(masks), torch.from_numpy(has_mask)
