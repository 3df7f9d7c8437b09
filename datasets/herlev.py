"""Herlev: single-cell Pap smear crops in seven classes, with binary and Bethesda 3-way views.

Layout: `ROOT/<class>/<field>-<cell>.<ext>` with the seven class folders below (the original
"New database pictures" folder, or the shared copy). Original `*-d.bmp` files are segmentation
masks and become `Item.mask`. Crops of one field of view share a group: from the `group` column
of `ROOT/manifest.csv` when present, else from the file name without its last `-<number>`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import (
    DatasetBase,
    DatasetError,
    Item,
    check_choice,
    collect_class_folders,
    list_images,
    load_table,
    relabel_items,
)
from fewclip.registry import DATASETS

CLASS_NAMES = [
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
]
ABNORMAL = CLASS_NAMES[3:]
# view -> (class names, source class -> view class, positive classes)
VIEWS = {
    "7class": (CLASS_NAMES, {name: name for name in CLASS_NAMES}, ABNORMAL),
    "binary": (
        ["normal", "abnormal"],
        {name: "abnormal" if name in ABNORMAL else "normal" for name in CLASS_NAMES},
        ["abnormal"],
    ),
    "bethesda": (  # TBS: mild dysplasia = LSIL; moderate, severe and CIS = HSIL
        ["normal", "lsil", "hsil"],
        {
            name: "normal"
            if name not in ABNORMAL
            else "lsil"
            if name == "light_dysplastic"
            else "hsil"
            for name in CLASS_NAMES
        },
        ["lsil", "hsil"],
    ),
}
MASK_SUFFIX = "-d"


def field_of_view(path: str | Path) -> str:
    """Group of a crop: its file name without the last `-<number>` ("153-154-002" -> "153-154")."""
    stem = Path(path).stem
    match = re.match(r"^(.+)-\d+$", stem)
    return match.group(1) if match else stem


@DATASETS.register()
class Herlev(DatasetBase):
    default_prompt_file = "herlev.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "HERLEV"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.VIEW = (
            "7class"  # "7class", "binary" (normal/abnormal) or "bethesda" (normal/lsil/hsil)
        )
        node.MANIFEST = (
            "manifest.csv"  # CSV in ROOT (path,label[,group]) read when present; "" = off
        )
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        view = check_choice(self.cfg.DATASET.HERLEV.VIEW, list(VIEWS), "DATASET.HERLEV.VIEW")
        manifest = self.cfg.DATASET.HERLEV.MANIFEST
        if manifest and (self.root / manifest).is_file():
            items = self._manifest_items(self.root / manifest)
        else:
            items = self._folder_items()
        class_names, mapping, positives = VIEWS[view]
        self.default_positive_classes = tuple(positives)
        return list(class_names), relabel_items(items, mapping, class_names)

    def _folder_items(self) -> list[Item]:
        found = collect_class_folders(self.root, CLASS_NAMES)
        masks = {
            (Path(item.path).parent, Path(item.path).stem[: -len(MASK_SUFFIX)]): item.path
            for item in found
            if Path(item.path).stem.endswith(MASK_SUFFIX)
        }
        return [
            Item(
                item.path,
                item.label,
                item.class_name,
                group=field_of_view(item.path),
                mask=masks.get((Path(item.path).parent, Path(item.path).stem), ""),
            )
            for item in found
            if not Path(item.path).stem.endswith(MASK_SUFFIX)
        ]

    def _manifest_items(self, manifest: Path) -> list[Item]:
        rows = load_table(manifest, ["path", "label"])
        items, missing = [], []
        for line, row in enumerate(rows, start=2):
            if row["label"] not in CLASS_NAMES:
                raise DatasetError(f"{manifest} line {line}: label {row['label']!r} is not a class")
            path = self.root / row["path"]
            if not path.is_file():
                missing.append(str(path))
            group = row.get("group") or field_of_view(path)
            label = CLASS_NAMES.index(row["label"])
            items.append(Item(os.path.abspath(path), label, row["label"], group=group))
        if missing:
            raise DatasetError(
                f"{manifest}: {len(missing)} listed images do not exist, e.g. {missing[0]}"
            )
        listed = {item.path for item in items}
        unlisted = [
            str(path)
            for name in CLASS_NAMES
            if (self.root / name).is_dir()
            for path in list_images(self.root / name)
            if os.path.abspath(path) not in listed and not path.stem.endswith(MASK_SUFFIX)
        ]
        if unlisted:
            raise DatasetError(
                f"{len(unlisted)} images under {self.root} are not in {manifest.name}, e.g. "
                f"{unlisted[0]} (add them or set DATASET.HERLEV.MANIFEST '')"
            )
        return items
