"""Multi-view logits (AMLPF-CLIP): windows at the image's own resolution plus the full image.

The released code (Xizhang-Yao/AMLPF-CLIP, main.py:125-166, utils.py:19-58) upscales an image
whose short side is below 512 so that it is 512 (bilinear; larger images stay as they are),
unfolds it into 224 x 224 windows with stride 32 (48 when either side is at least 1024), keeps 8
of them (random with replacement in training, every floor(n / 8)-th at test) plus the whole
image resized to 224 x 224, and scores logits = (mean over windows + full) / 2 (models.py:145-150,
174-180), in training and at test, the teacher on the same views (models.py:183-185).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from yacs.config import CfgNode

MULTIVIEW_MODES = ("source", "test_only", "off")


def multiview_config_node() -> CfgNode:
    """The MULTIVIEW node of a trainer that scores windows and the full image."""
    node = CfgNode()
    node.MODE = "source"  # source (training and test views) | test_only | off (one view)
    node.WINDOWS = 8  # windows averaged, then with the full image (the source's num_patch)
    node.WINDOW_SIZE = 0  # window side in stored pixels; 0 = the model input (the source: 224)
    node.MIN_SIDE = 512  # a shorter image side is first upscaled to this (AdaptiveResize(512))
    node.STRIDE = 32  # window stride
    node.LARGE_STRIDE = 48  # stride when either side is >= LARGE_SIDE
    node.LARGE_SIDE = 1024
    return node


def check_multiview_node(node: CfgNode, key: str) -> None:
    """One-line errors naming the key and the choices or the bound."""
    if node.MODE not in MULTIVIEW_MODES:
        raise ValueError(f"{key}.MODE {node.MODE!r} is not one of {', '.join(MULTIVIEW_MODES)}")
    for name in ("WINDOWS", "MIN_SIDE", "STRIDE", "LARGE_STRIDE", "LARGE_SIDE"):
        if int(node[name]) < 1:
            raise ValueError(f"{key}.{name} must be >= 1 (got {node[name]})")


def compute_upscaled_size(height: int, width: int, min_side: int) -> tuple[int, int]:
    """(H', W') after the source's AdaptiveResize(min_side) (utils.py:49-58, torchvision Resize
    of the short side): unchanged when both sides are >= min_side."""
    if height >= min_side and width >= min_side:
        return height, width
    if height <= width:
        return min_side, int(min_side * width / height)
    return int(min_side * height / width), min_side


def compute_window_boxes(
    height: int, width: int, window: int, stride: int, large_stride: int, large_side: int
) -> list[tuple[int, int]]:
    """(top, left) of every window of side `window`, row-major, as the source's
    `unfold(2, k, step).unfold(3, k, step)` (main.py:138-146): step = large_stride when
    height or width >= large_side, else stride; positions 0, step, ... while the window fits."""
    if height < window or width < window:
        raise ValueError(f"image {height} x {width} is smaller than the {window}-pixel window")
    step = large_stride if height >= large_side or width >= large_side else stride
    return [
        (top, left)
        for top in range(0, height - window + 1, step)
        for left in range(0, width - window + 1, step)
    ]


def select_windows(
    count: int, num_windows: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num_windows,) window indices: with a generator (training) uniform with replacement
    (main.py:156), without (test) i * floor(count / num_windows) (main.py:149-154)."""
    if count < num_windows:  # the source asserts the same (main.py:148)
        raise ValueError(f"{count} windows fit in the image, fewer than the {num_windows} asked")
    if generator is not None:
        return torch.randint(0, count, (num_windows,), generator=generator)
    return torch.arange(num_windows) * (count // num_windows)


def build_views(
    images: torch.Tensor, node: CfgNode, input_size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, V + 1, 3, s, s): V windows, then the full image.

    s = `input_size`. Each image draws its own windows in training (`generator`); at test all
    take the same fixed ones. Upscaling and the full view are bilinear, as the source's
    (utils.py:56 Resize, main.py:163 F.interpolate).
    """
    height, width = compute_upscaled_size(*images.shape[-2:], int(node.MIN_SIDE))
    if (height, width) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    window = int(node.WINDOW_SIZE) or input_size
    boxes = compute_window_boxes(
        height, width, window, int(node.STRIDE), int(node.LARGE_STRIDE), int(node.LARGE_SIDE)
    )
    count, batch = len(boxes), images.shape[0]
    fixed = None if generator is not None else select_windows(count, int(node.WINDOWS))
    views = []
    for index in range(batch):
        chosen = fixed if fixed is not None else select_windows(count, node.WINDOWS, generator)
        for box in chosen.tolist():
            top, left = boxes[box]
            views.append(images[index, :, top : top + window, left : left + window])
    windows = torch.stack(views).view(batch, int(node.WINDOWS), -1, window, window)
    if window != input_size:
        flat = F.interpolate(
            windows.flatten(0, 1), size=(input_size,) * 2, mode="bilinear", align_corners=False
        )
        windows = flat.view(batch, int(node.WINDOWS), -1, input_size, input_size)
    full = F.interpolate(images, size=(input_size,) * 2, mode="bilinear", align_corners=False)
    return torch.cat([windows, full[:, None]], dim=1)


def combine_view_logits(view_logits: torch.Tensor) -> torch.Tensor:
    """(B, V + 1, C) -> (B, C) = (mean over the V windows + the full image's) / 2
    (models.py:31, 145-150)."""
    return (view_logits[:, :-1].mean(dim=1) + view_logits[:, -1]) / 2


def compute_multiview_logits(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor
) -> torch.Tensor:
    """(B, C) combined logits of (B, V + 1, 3, s, s) views, one forward over all B (V + 1)."""
    batch, count = views.shape[:2]
    logits = compute_logits(views.flatten(0, 1))
    return combine_view_logits(logits.view(batch, count, -1))


def resize_to_input(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """Deterministic single view of a stored image at the model input (bicubic, antialiased)."""
    if tuple(images.shape[-2:]) == (input_size, input_size):
        return images
    size = (input_size, input_size)
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
