"""Dataset protocol: `Item`, `DatasetBase` (validation, prompts, summary) and image loading.

A dataset file subclasses `DatasetBase` and implements `load_items()`, which parses the on-disk
layout into class names and items; everything else (checks, prompts, positive classes, the
summary) lives here so every dataset behaves the same.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from yacs.config import CfgNode

from fewclip.prompts import PromptSet, build_default_prompts, load_prompt_file

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_DIR = REPO_ROOT / "configs" / "prompts"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_CENTER = "default"


class DatasetError(ValueError):
    """A dataset that cannot be used as is; the message names the class, center, file or key."""


class ImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute path of the image
    label: int  # index into dataset.class_names
    class_name: str
    center: str = DEFAULT_CENTER
    group: str = ""  # patient / slide / field-of-view id; "" = none
    split: str = ""  # official split: "train", "val", "test" or ""
    mask: str = ""  # optional region-of-interest mask image path


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (no recursion, no hidden files), sorted by name."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file()
        and not entry.name.startswith(".")
        and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def collect_items(
    root: Path, class_names: list[str], centers: list[str] | None = None
) -> list[Item]:
    """Items of `root/<class>/*` (centers None) or `root/<center>/<class>/*`.

    A class folder missing in a center yields no items there (DatasetBase then names the class
    and centers); a class folder that exists but holds no images is an error naming the folder.
    """
    items = []
    for center in centers if centers is not None else [None]:
        base = root / center if center is not None else root
        for label, name in enumerate(class_names):
            folder = base / name
            if not folder.is_dir():
                continue
            files = list_images(folder)
            if not files:
                raise DatasetError(
                    f"class {name!r} folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            for file in files:
                items.append(Item(str(file), label, name, center or DEFAULT_CENTER))
    return items


def list_subfolders(folder: Path) -> list[Path]:
    """Folders directly inside `folder` (no hidden ones), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_images(root: Path) -> list[Path]:
    """Image files anywhere under `root` (hidden files and folders skipped), sorted by path."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(
            Path(folder) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def parse_name_folders(entries: Sequence[str], key: str) -> list[tuple[str, str]]:
    """`["name", "name=folder", ...]` -> [(name, folder)]: a name read from a differently named
    folder (a center folder, or a class folder named otherwise in one center)."""
    pairs = []
    for entry in entries:
        name, separator, folder = str(entry).partition("=")
        name, folder = name.strip(), folder.strip() if separator else name.strip()
        if not name or not folder:
            raise DatasetError(f"{key} entry {entry!r} must be 'name' or 'name=folder'")
        pairs.append((name, folder))
    return pairs


def collect_class_folders(
    base: Path,
    class_names: Sequence[str],
    center: str = DEFAULT_CENTER,
    class_folders: Mapping[str, str] | None = None,
    alias_key: str = "",
) -> list[Item]:
    """Items of `base/<class folder>/*` for one center; every folder must be a class.

    A folder is a class by its name or through `class_folders` (folder name -> class name). Any
    other folder is an error naming it and the classes, so a class named differently in one
    center never becomes a silent extra or missing class; an empty class folder is an error too.
    """
    if not base.is_dir():
        raise DatasetError(f"center {center!r} folder {base} does not exist")
    class_folders = dict(class_folders or {})
    items = []
    for folder in list_subfolders(base):
        name = class_folders.get(folder.name, folder.name)
        if name not in class_names:
            hint = f"; map it to a class with {alias_key} 'class=folder'" if alias_key else ""
            raise DatasetError(
                f"folder {folder} (center {center!r}) is not a class of this dataset "
                f"({', '.join(class_names)}){hint}"
            )
        files = list_images(folder)
        if not files:
            raise DatasetError(
                f"class {name!r} folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        label = list(class_names).index(name)
        items.extend(Item(str(file), label, name, center) for file in files)
    return items


def collect_center_folders(
    root: Path,
    class_names: Sequence[str],
    centers: Sequence[str],
    class_folders: Sequence[str] = (),
    keys: tuple[str, str] = ("CENTERS", "CLASS_FOLDERS"),
    subfolder: str = "",
) -> list[Item]:
    """Items of `root/<center folder>[/<subfolder>]/<class folder>/*`.

    centers: "center" or "center=folder" entries; class_folders: "class=folder" entries for
    class folders named otherwise (in any center); keys: the config keys of both, for errors.
    """
    aliases = {folder: name for name, folder in parse_name_folders(class_folders, keys[1])}
    items = []
    for center, folder in parse_name_folders(centers, keys[0]):
        base = root / folder / subfolder if subfolder else root / folder
        items.extend(collect_class_folders(base, class_names, center, aliases, keys[1]))
    return items


def load_table(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; a missing file or column is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    missing = [name for name in required if name not in columns]
    if missing:
        raise DatasetError(f"table {path} has no column {', '.join(missing)}")
    return rows


def relabel_items(
    items: Sequence[Item], mapping: Mapping[str, str], class_names: Sequence[str]
) -> list[Item]:
    """Items with class names replaced through `mapping` (a view: 7 classes -> 2, ...)."""
    relabelled = []
    for item in items:
        name = mapping[item.class_name]
        relabelled.append(
            dataclasses.replace(item, class_name=name, label=list(class_names).index(name))
        )
    return relabelled


def check_choice(value: str, choices: Sequence[str], key: str) -> str:
    """`value` if it is one of `choices`, else an error naming the key and the choices."""
    if value not in choices:
        raise DatasetError(f"{key} is {value!r}; choose one of {', '.join(choices)}")
    return value


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth grey image to 0..255 by the smallest bit depth that holds its max.

    A 12-bit scan (max < 4096) is divided by 4095, a full 16-bit one by 65535, so images of one
    scanner keep their relative brightness; float images in [0, 1] are scaled by 255.
    """
    is_float = np.issubdtype(array.dtype, np.floating)
    array = np.clip(array.astype(np.float64), 0, None)
    peak = float(array.max()) if array.size else 0.0
    if is_float and 0 < peak <= 1.0:
        scale = 1.0
    elif peak <= 255:
        scale = 255.0
    else:
        bits = next(b for b in (10, 12, 14, 16, 24, 32) if peak < 2**b)
        scale = float(2**bits - 1)
    return np.round(array / scale * 255.0).clip(0, 255).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image as 8-bit RGB; grey, palette, alpha (over white) and 16-bit modes convert.

    Raises `ImageError` naming the file when it is missing, empty, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                grey = _to_uint8(np.asarray(image))
                return Image.fromarray(grey, mode="L").convert("RGB")
            if mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
                mode = "RGBA"
            if mode in ("RGBA", "LA", "PA"):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def find_unreadable(paths: Sequence[str]) -> list[str]:
    """The `ImageError` message of every file among `paths` that does not decode (fully, as a
    run would), in path order; decoded in threads (PIL releases the GIL)."""

    def problem(path: str) -> str | None:
        try:
            load_image(path)
        except ImageError as error:
            return str(error)
        return None

    threads = min(8, os.cpu_count() or 1, max(1, len(paths)))
    with ThreadPoolExecutor(threads) as pool:
        return [message for message in pool.map(problem, paths) if message is not None]


def resolve_prompt_path(name: str) -> Path:
    """A prompt file: absolute, relative to the working folder, or inside configs/prompts/."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.is_file():
        return path
    return PROMPT_DIR / name


def _plain(node: object) -> object:
    """A config node as plain dicts and lists (for hashing)."""
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    return node


class DatasetBase(abc.ABC):
    """Base of registered datasets. Subclasses implement `load_items()`.

    Attributes after construction: `root`, `class_names`, `items` (sorted by path), `centers`
    (sorted), `positive_classes` (names), `prompts` (PromptSet). A dataset with several views
    (7 classes or 2, ...) may set `self.default_positive_classes` inside `load_items()`.
    """

    default_prompt_file: str = ""  # inside configs/prompts/; "" = prompts from class names
    default_positive_classes: tuple[str, ...] = ()

    def __init__(self, cfg: CfgNode) -> None:
        self.cfg = cfg
        self.name = type(self).__name__
        self.root = self.resolve_root()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist (DATASET.ROOT)")
        class_names, items = self.load_items()
        self.class_names = list(class_names)
        self.items = sorted(items, key=lambda item: item.path)
        self.centers = sorted({item.center for item in self.items})
        self._validate()
        self.positive_classes = self._positive_classes()
        self.prompts = self._load_prompts()

    # --- for subclasses -------------------------------------------------------------------
    def resolve_root(self) -> Path:
        """The data folder; default: DATASET.ROOT (required)."""
        root = self.cfg.DATASET.ROOT
        if not root:
            raise DatasetError(f"DATASET.ROOT is empty; {self.name} needs the data folder")
        return Path(os.path.abspath(Path(root).expanduser()))

    @abc.abstractmethod
    def load_items(self) -> tuple[list[str], list[Item]]:
        """Parse the layout under `self.root` into (class names in label order, items)."""

    @property
    def split_key(self) -> str:
        """Folder name of this dataset's split files: class, data folder and, when the dataset
        has its own config node (views, centers, levels), a hash of it, so a changed view
        draws its own split instead of failing on the old one."""
        key = f"{self.name}_{self.root.name}"
        node_key = type(self).config_key() if hasattr(type(self), "config_key") else ""
        if node_key and node_key in self.cfg.DATASET:
            text = json.dumps(_plain(self.cfg.DATASET[node_key]), sort_keys=True)
            key += "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
        return key

    # --- shared behaviour -----------------------------------------------------------------
    def _validate(self) -> None:
        if not self.class_names:
            raise DatasetError(f"{self.name} found no classes under {self.root}")
        duplicates = [name for name, n in Counter(self.class_names).items() if n > 1]
        if duplicates:
            raise DatasetError(f"{self.name}: class names repeated: {', '.join(duplicates)}")
        counts = self.count_table()
        for name in self.class_names:
            present = [c for c in self.centers if counts[c][name] > 0]
            if not present:
                raise DatasetError(f"class {name!r} has no images under {self.root}")
            absent = [c for c in self.centers if counts[c][name] == 0]
            if absent:
                raise DatasetError(
                    f"class {name!r} has images in centers {', '.join(present)} but none in "
                    f"{', '.join(absent)} (under {self.root})"
                )
        for item in self.items:
            if not 0 <= item.label < len(self.class_names) or (
                self.class_names[item.label] != item.class_name
            ):
                raise DatasetError(
                    f"item {item.path} has label {item.label} != {item.class_name!r}"
                )

    def _positive_classes(self) -> list[str]:
        names = list(self.cfg.DATASET.POSITIVE_CLASSES) or list(self.default_positive_classes)
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise DatasetError(
                f"DATASET.POSITIVE_CLASSES names unknown classes {', '.join(unknown)}; "
                f"classes are {', '.join(self.class_names)}"
            )
        return names

    def _load_prompts(self) -> PromptSet:
        name = self.cfg.DATASET.PROMPT_FILE or self.default_prompt_file
        if not name:
            return build_default_prompts(self.class_names)
        return load_prompt_file(resolve_prompt_path(name), self.class_names)

    def count_table(self) -> dict[str, Counter]:
        """center -> Counter(class name -> number of images)."""
        table: dict[str, Counter] = {center: Counter() for center in self.centers}
        for item in self.items:
            table[item.center][item.class_name] += 1
        return table

    def describe(self) -> str:
        """A text table of image counts per class (rows) and center (columns)."""
        counts = self.count_table()
        width = max(len(name) for name in [*self.class_names, "total", "class"])
        columns = [*self.centers, "total"]
        widths = [max(len(column), 6) for column in columns]
        lines = [f"{self.name} at {self.root}: {len(self.items)} images"]
        lines.append(
            "  ".join([f"{'class':<{width}}"] + [f"{c:>{w}}" for c, w in zip(columns, widths)])
        )
        for name in [*self.class_names, "total"]:
            if name == "total":
                values = [sum(counts[c].values()) for c in self.centers]
            else:
                values = [counts[c][name] for c in self.centers]
            cells = [f"{v:>{w}}" for v, w in zip([*values, sum(values)], widths)]
            lines.append("  ".join([f"{name:<{width}}", *cells]))
        return "\n".join(lines)
