"""Decoded images: every image of a dataset decoded and resized once, shared by a whole sweep.

An `ImageStore` covers the images a sweep can touch (the dataset's items in the centers its
splits draw from) as one uint8 row store under `CACHE_DIR/images/` (see fewclip/stores.py),
keyed by everything the pixels depend on: each file's path, size, modification and change
times and inode, the stored size and the resize recipe; a changed file changes the key, so a
stale entry is never read. The first touch decodes every image that can be validation or test
data in some seed (all items, except those of an official "train" split, which are decoded
as shots ask for them), so later cells of a sweep decode (almost) nothing. Evaluation sets
are `ImageRows` views that read one batch at a time from the store file; training sets are
copied into memory once (they are small) and stay there for the whole fit.

Store geometry (INPUT.STORE_SIZE): a row is the image's short side resized (bicubic) to the
stored size S, then the centre S x S square: S = the model input (0, the default) is exactly the
evaluation crop; S > input keeps that same region at (close to) the image's own resolution, for
random training crops and multi-view windows cut from it. One square row shape keeps the store a
fixed-stride memory map (no per-row sizes, no orientation cases) and makes the input-size view
a plain resize of the row: evaluation then sees the same region as with S = 0, resized
deterministically (`resize_rows`). Non-square images lose their long-side margins, as the
evaluation crop always did.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewclip.config import ConfigError
from fewclip.data import ImageError, Item, load_image
from fewclip.stores import EMPTY, FAILED, FILLED, RowStore

LOGGER = logging.getLogger(__name__)
RESIZE_RECIPE = "short-side-bicubic+center-crop+v1"
VIEW_RECIPE = "bicubic-antialias+v1"  # stored row -> model input (when STORE_SIZE > input)
CHUNK_ROWS = 128  # images decoded (and flushed to the store) per locked step
_DECODE_SECONDS = [0.0]  # wall time this process spent decoding image files


def check_store_size(store_size: int, image_size: int) -> int:
    """The stored short side: STORE_SIZE, or the model input when it is 0; a ConfigError (before
    anything is decoded) when it is negative or smaller than the model input."""
    if store_size < 0 or 0 < store_size < image_size:
        raise ConfigError(
            f"INPUT.STORE_SIZE {store_size} is smaller than the model input {image_size}: use 0 "
            f"(store at the input size) or a value >= {image_size}"
        )
    return int(store_size or image_size)


def compute_image_key(items: Sequence[Item], image_size: int) -> str:
    """Hash of the file list (path, size, mtime, ctime, inode), the resize recipe and the size
    the rows are stored at (`image_size`: STORE_SIZE, or the model input when that is 0).

    The change time and inode catch content rewritten with its old modification time restored
    (`cp -p`, `rsync -t`), which size and mtime alone would miss.
    """
    digest = hashlib.sha1(f"{RESIZE_RECIPE}:{image_size}".encode())
    _digest_files(digest, items)
    return digest.hexdigest()[:20]


def compute_files_key(items: Sequence[Item]) -> str:
    """Hash of the files of `items` as they are on disk now (path, size, mtime, ctime, inode):
    a run's results record it, so an image rewritten in place gives another key."""
    digest = hashlib.sha1(b"files-v1")
    _digest_files(digest, sorted(items, key=lambda item: item.path))
    return digest.hexdigest()[:20]


def _digest_files(digest: Any, items: Sequence[Item]) -> None:
    for item in items:
        try:
            stat = os.stat(item.path)
            digest.update(
                f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0"
                f"{stat.st_ino}\n".encode()
            )
        except OSError:
            digest.update(f"{item.path}\0missing\n".encode())


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


def resize_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """Deterministic view of stored square rows at the model input: (N, S, S, 3) uint8 ->
    (N, size, size, 3) uint8, antialiased bicubic (PIL-like), rounded; S == size is a no-op."""
    if rows.shape[1] == size and rows.shape[2] == size:
        return rows
    tensor = torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(tensor, size=(size, size), mode="bicubic", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def decoding_seconds() -> float:
    """Wall time this process has spent decoding image files (for run timings)."""
    return _DECODE_SECONDS[0]


def _decode_one(path: str, image_size: int) -> np.ndarray | None:
    try:
        return resize_center_crop(load_image(path), image_size)
    except ImageError as error:
        LOGGER.warning("%s", error)
        return None


def decode_paths(paths: Sequence[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize files in threads (PIL releases the GIL) -> ((N, S, S, 3) uint8, ok)."""
    started = time.perf_counter()
    threads = min(8, os.cpu_count() or 1, max(1, len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        decoded = list(pool.map(lambda path: _decode_one(path, image_size), paths))
    array = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
    ok = np.array([image is not None for image in decoded], dtype=bool)
    for index, image in enumerate(decoded):
        if image is not None:
            array[index] = image
    _DECODE_SECONDS[0] += time.perf_counter() - started
    return array, ok


def decode_items(
    items: Sequence[Item], image_size: int, skip_unreadable: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Decode and resize `items` in memory -> (N', H, W, 3) uint8 and the indices kept."""
    array, ok = decode_paths([item.path for item in items], image_size)
    _raise_unreadable(items, ok, skip_unreadable)
    kept = np.flatnonzero(ok)
    return array[kept], kept.tolist()


def _raise_unreadable(items: Sequence[Item], ok: np.ndarray, skip_unreadable: bool) -> None:
    """Re-read the first unreadable file so the error names it and says why."""
    if not skip_unreadable and not ok.all():
        path = items[int(np.flatnonzero(~ok)[0])].path
        load_image(path)  # raises ImageError naming the file and the reason
        raise ImageError(f"cannot read image {path}")


def compute_store_items(all_items: Sequence[Item], used_items: Sequence[Item]) -> list[Item]:
    """The images a sweep over these splits can touch: every item in a center that `used_items`
    draw from (other seeds draw other images of the same centers), plus `used_items`; by path."""
    centers = {item.center for item in used_items}
    chosen = {item.path: item for item in all_items if item.center in centers}
    for item in used_items:
        chosen.setdefault(item.path, item)
    return [chosen[path] for path in sorted(chosen)]


class ImageRows:
    """Rows of a decoded-image store, read on demand: indexes like a (N, H, W, 3) uint8 array.

    `view[a:b]`, `view[indices]` and `view[i]` read just those images into memory, so an
    evaluation set of any size costs no memory beyond the batch being read.
    """

    def __init__(self, data: RowStore, rows: np.ndarray, output_size: int | None = None) -> None:
        self.data = data  # the row store of decoded images; `ImageRows(view.data, rows)` re-views
        self.rows = np.asarray(rows, dtype=np.int64)
        self.output_size = output_size  # rows resized to it on read (`resize_rows`); None = stored
        stored = data.row_shape
        self.shape = (len(self.rows), *((output_size, output_size, 3) if output_size else stored))
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return self._read(np.array([rows]))[0]
        return self._read(rows)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        array = self.data.read(rows)
        return resize_rows(array, self.output_size) if self.output_size else array

    def stored(self) -> ImageRows:
        """The same rows at the stored size (no resize on read)."""
        return ImageRows(self.data, self.rows)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._read(self.rows)
        return array if dtype is None else array.astype(dtype)


def take_rows(images: np.ndarray | ImageRows, rows: np.ndarray) -> np.ndarray | ImageRows:
    """`images[rows]` for contiguous `rows`, still lazy for a store view (read batch by batch)."""
    if isinstance(images, ImageRows):
        return ImageRows(images.data, images.rows[rows], images.output_size)
    if len(rows) == 0:
        return images[:0]
    return images[int(rows[0]) : int(rows[-1]) + 1]


@dataclass
class DecodedImages:
    images: np.ndarray | ImageRows  # (N', H, W, 3) uint8: in memory, or a view of the store
    kept: list[int]  # indices of the requested items that were readable
    rows: np.ndarray | None  # their rows in `store` (None without a cache)
    store: ImageStore | None


class ImageStore:
    """Decoded images of `items` for a model input of `image_size`, stored at `store_size`
    (INPUT.STORE_SIZE; 0 = `image_size`); `cache_dir` None = decode in memory only.
    `decode_all` False (a one-off run): decode only the rows read, not every evaluation row; the
    key and the rows are the same, so a later sweep fills in the rest."""

    def __init__(
        self,
        items: Sequence[Item],
        image_size: int,
        cache_dir: str | Path | None,
        store_size: int = 0,
        decode_all: bool = True,
    ) -> None:
        self.stored_size = check_store_size(store_size, image_size)  # before any decoding
        self.items = sorted({item.path: item for item in items}.values(), key=lambda i: i.path)
        self.image_size = image_size
        self.row_of = {item.path: row for row, item in enumerate(self.items)}
        self.key = compute_image_key(self.items, self.stored_size) if cache_dir else ""
        # what the model sees: the rows themselves, or their deterministic resize to the input
        native = self.stored_size != image_size
        self.input_key = f"{self.key}|{VIEW_RECIPE}:{image_size}" if native else self.key
        self.rows = (
            RowStore(Path(cache_dir) / "images", self.key, len(self.items), np.uint8)
            if cache_dir and self.items
            else None
        )
        self.eager = np.array(
            [row for row, item in enumerate(self.items) if decode_all and item.split != "train"],
            np.int64,
        )

    def ensure(self, rows: np.ndarray) -> None:
        """Decode whatever of `rows`, and of the rows every seed may evaluate, is not stored yet."""
        if self.rows is None:
            raise RuntimeError("ImageStore.ensure needs a cache folder")
        todo = np.union1d(self.eager, rows).astype(np.int64)
        chunks = [todo[start : start + CHUNK_ROWS] for start in range(0, len(todo), CHUNK_ROWS)]
        self.rows.fill(chunks, self._decode_missing)  # remembered: damaged rows are redone

    def _decode_missing(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values of a chunk's rows for `RowStore.fill`, decoding only its EMPTY rows (the store
        writes only those; a decoded image does not depend on its chunk-mates)."""
        size = self.stored_size
        values = np.zeros((len(chunk), size, size, 3), dtype=np.uint8)
        ok = np.ones(len(chunk), dtype=bool)
        missing = self.rows.states(chunk) == EMPTY
        if missing.any():
            paths = [self.items[row].path for row in chunk[missing]]
            values[missing], ok[missing] = decode_paths(paths, size)
        return values, ok

    def read(self, rows: np.ndarray, stored: bool = False) -> np.ndarray:
        """(len(rows), S, S, 3) uint8 at the model input (or `stored` size), decoding missing
        rows first."""
        self.ensure(rows)
        array = self.rows.read(rows)
        return array if stored else resize_rows(array, self.image_size)

    def load(
        self,
        items: Sequence[Item],
        skip_unreadable: bool = False,
        in_memory: bool = False,
        stored: bool | None = None,
    ) -> DecodedImages:
        """Images of `items` (which must be in the store); unreadable ones raise `ImageError`
        naming the file, or are dropped when `skip_unreadable` (see `kept`). `stored` (default:
        `in_memory`, the training set that is cropped from) keeps the stored size; otherwise the
        images are the deterministic model-input view."""
        stored = in_memory if stored is None else stored
        size = None if stored or self.stored_size == self.image_size else self.image_size
        if self.rows is None:
            images, kept = decode_items(items, self.stored_size, skip_unreadable)
            images = images if size is None else resize_rows(images, size)
            return DecodedImages(images, kept, None, None)
        missing = [item.path for item in items if item.path not in self.row_of]
        if missing:
            raise KeyError(f"image {missing[0]} is not in the decoded-image store {self.key}")
        rows = np.array([self.row_of[item.path] for item in items], dtype=np.int64)
        self.ensure(rows)
        states = self.rows.states(rows)
        _raise_unreadable(items, states != FAILED, skip_unreadable)
        kept = np.flatnonzero(states == FILLED)
        rows = rows[kept]
        if in_memory:
            images = self.rows.read(rows)
            images = images if size is None else resize_rows(images, size)
        else:
            images = ImageRows(self.rows, rows, size)
        return DecodedImages(images, kept.tolist(), rows, self)


def load_image_array(
    items: Sequence[Item],
    image_size: int,
    cache_dir: str | Path | None,
    skip_unreadable: bool = False,
) -> tuple[np.ndarray | ImageRows, list[int]]:
    """Decoded uint8 images of `items` (read from the store on demand when cached) and the
    indices of the items kept."""
    decoded = ImageStore(items, image_size, cache_dir).load(items, skip_unreadable)
    return decoded.images, decoded.kept


def _as_tensor(batch: np.ndarray) -> torch.Tensor:
    """A CPU tensor of an array, copied only when read-only (memory maps) or not contiguous."""
    array = np.asarray(batch)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)
    return torch.from_numpy(array)


@functools.lru_cache(maxsize=16)
def _normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, device=device).view(shape)
    return mean_t, torch.tensor(std, device=device).view(shape)


def to_model_input(
    batch: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised with CLIP's mean and std.

    The uint8 batch moves to the device first (4x fewer bytes than floats); the arithmetic is
    torchvision's ToTensor + Normalize, (x / 255 - mean) / std, in place.
    """
    tensor = batch if isinstance(batch, torch.Tensor) else _as_tensor(batch)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    tensor = tensor.to(device, non_blocking=True).permute(0, 3, 1, 2)
    tensor = tensor.to(torch.float32, memory_format=layout, copy=True)  # never the caller's
    mean_t, std_t = _normalisation(tuple(mean), tuple(std), torch.device(device))
    return tensor.div_(255.0).sub_(mean_t).div_(std_t)


def iterate_image_batches(
    images: np.ndarray | ImageRows, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """uint8 (B, H, W, 3) batches of `images` on `device`, in order, without a DataLoader.

    A background thread reads the next batch (from the memory map; into pinned memory on GPU,
    so the copy to the device overlaps compute) while the caller works on the current one.
    """
    count = len(images)
    pin = torch.device(device).type == "cuda"

    def read(start: int) -> torch.Tensor:
        tensor = _as_tensor(images[start : start + batch_size])
        return tensor.pin_memory() if pin else tensor

    if count == 0:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        for start in range(0, count, batch_size):
            batch = pending.result()
            if start + batch_size < count:
                pending = pool.submit(read, start + batch_size)
            yield batch.to(device, non_blocking=True)


def hold_training_images(
    images: np.ndarray | ImageRows, device: torch.device, device_limit_mb: float
) -> torch.Tensor:
    """The decoded training images as one uint8 (N, H, W, 3) tensor, held for the whole fit.

    On CPU it shares the array's memory (no copy). On GPU the set moves to the device once when
    it fits in `device_limit_mb`, else it stays in pinned host memory (fast, async copies).
    """
    tensor = _as_tensor(images)
    if torch.device(device).type != "cuda":
        return tensor
    if tensor.numel() <= device_limit_mb * 2**20:
        return tensor.to(device)
    return tensor.pin_memory()
