"""ImageFolder: `root/<class>/*` or `root/<center>/<class>/*` (detected, or DATASET.CENTERS).

Class names come from DATASET.CLASS_NAMES (their order is the label order) or the sorted class
folder names; prompts from DATASET.PROMPT_FILE or, if empty, from the class names.
"""

from __future__ import annotations

from pathlib import Path

from fewclip.data import DatasetBase, DatasetError, Item, collect_items, list_images
from fewclip.registry import DATASETS


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_centers(root: Path, class_names: list[str]) -> list[str] | None:
    """Center folder names if `root` holds `<center>/<class>/` folders, None if `<class>/`.

    Flat when the named classes are folders of `root`, or when some folder of `root` holds
    images directly; centered when folders of `root` hold only class folders.
    """
    folders = _subfolders(root)
    if class_names and all((root / name).is_dir() for name in class_names):
        return None
    if any(list_images(folder) for folder in folders):
        return None
    if folders and all(_subfolders(folder) for folder in folders):
        return [folder.name for folder in folders]
    return None


@DATASETS.register()
class ImageFolder(DatasetBase):
    def load_items(self) -> tuple[list[str], list[Item]]:
        given_classes = list(self.cfg.DATASET.CLASS_NAMES)
        centers = list(self.cfg.DATASET.CENTERS) or detect_centers(self.root, given_classes)
        for center in centers or []:
            if not (self.root / center).is_dir():
                found = ", ".join(p.name for p in _subfolders(self.root))
                raise DatasetError(
                    f"center folder {self.root / center} does not exist; found: {found}"
                )
        if given_classes:
            class_names = given_classes
        else:
            bases = [self.root / center for center in centers] if centers else [self.root]
            class_names = sorted({p.name for base in bases for p in _subfolders(base)})
        if not class_names:
            raise DatasetError(f"no class folders under {self.root}")
        expected = [self.root / c for c in centers] if centers else [self.root]
        for name in class_names:
            if not any((base / name).is_dir() for base in expected):
                raise DatasetError(f"class {name!r} has no folder under {self.root}")
        return class_names, collect_items(self.root, class_names, centers)
