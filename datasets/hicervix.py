"""HiCervix: 40,229 cervical cytology cells with a three-level class hierarchy (Cai et al. 2024).

Layout of the release: `ROOT/{train,val,test}.csv` with columns image_name, class_name,
class_id, level_1, level_2, level_3, and the images in `ROOT/{train,val,test}/<image_name>`
(or all in `ROOT/images/`, or in ROOT). The official split is used as is. DATASET.HICERVIX.LEVEL
picks the label: 1 (negative, ASC, AGC, microbe), 2 (21 Bethesda-style classes), 3 (the
finest glandular subclasses), or 0 (the annotated `class_name`, 26 classes). An image labelled
only at a coarser level than LEVEL is dropped (counted in the log) or keeps its coarser label.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import DatasetBase, DatasetError, Item, check_choice, load_table
from fewclip.registry import DATASETS

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
COLUMNS = ["image_name", "class_name", "class_id", "level_1", "level_2", "level_3"]
ABNORMAL = {  # Bethesda epithelial abnormalities at any level: the positive side
    "ASC", "AGC", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC-NOS", "AGC-FN", "ADC",
    "AGC-ECC-NOS", "AGC-EMC-NOS", "ADC-ECC", "ADC-EMC",
}  # fmt: skip


def label_at_level(row: dict[str, str], level: int, missing: str) -> str:
    """The row's class at `level` (0 = class_name); "" when absent and missing == "drop"."""
    if level == 0:
        return row["class_name"]
    for current in range(level, 0, -1):
        if row[f"level_{current}"]:
            return row[f"level_{current}"]
        if missing == "drop":
            return ""
    return ""


def find_image_folder(root: Path, split: str, first_image: str) -> Path:
    """The folder holding a split's images: ROOT/<split>, ROOT/images or ROOT."""
    for folder in (root / split, root / "images", root):
        if (folder / first_image).is_file():
            return folder
    places = ", ".join(str(folder) for folder in (root / split, root / "images", root))
    raise DatasetError(f"HiCervix {split} image {first_image} is in none of {places}")


@DATASETS.register()
class HiCervix(DatasetBase):
    default_prompt_file = "hicervix.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "HICERVIX"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.LEVEL = 2  # hierarchy level of the labels: 1, 2, 3, or 0 = the class_name column
        node.MISSING_LEVEL = "drop"  # image without a label at LEVEL: "drop" or "coarser"
        node.TRAIN_CSV = "train.csv"  # official split tables, in ROOT
        node.VAL_CSV = "val.csv"
        node.TEST_CSV = "test.csv"
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.HICERVIX
        if node.LEVEL not in (0, 1, 2, 3):
            raise DatasetError(f"DATASET.HICERVIX.LEVEL is {node.LEVEL}; choose 0, 1, 2 or 3")
        missing = check_choice(
            node.MISSING_LEVEL, ["drop", "coarser"], "DATASET.HICERVIX.MISSING_LEVEL"
        )
        labelled: list[tuple[str, int, str, str]] = []  # (path, class_id, class name, split)
        dropped = 0
        for split, name in zip(SPLITS, (node.TRAIN_CSV, node.VAL_CSV, node.TEST_CSV)):
            table = self.root / name
            rows = load_table(table, COLUMNS)
            if not rows:
                raise DatasetError(f"HiCervix table {table} has no rows")
            folder = find_image_folder(self.root, split, rows[0]["image_name"])
            absent = [r["image_name"] for r in rows if not (folder / r["image_name"]).is_file()]
            if absent:
                raise DatasetError(
                    f"{table}: {len(absent)} listed images are not in {folder}, e.g. {absent[0]}"
                )
            for line, row in enumerate(rows, start=2):
                if not row["class_id"].isdigit():
                    raise DatasetError(f"{table} line {line}: class_id {row['class_id']!r}")
                label = label_at_level(row, node.LEVEL, missing)
                if not label:
                    dropped += 1
                    continue
                path = os.path.abspath(folder / row["image_name"])
                labelled.append((path, int(row["class_id"]), label, split))
        if dropped:
            LOGGER.warning(
                "HiCervix: %d images have no level-%d label and were dropped "
                "(DATASET.HICERVIX.MISSING_LEVEL coarser keeps their coarser label)",
                dropped,
                node.LEVEL,
            )
        # classes in hierarchy order: by the smallest fine class id that carries them
        order: dict[str, int] = {}
        for _, class_id, name, _ in labelled:
            order[name] = min(order.get(name, class_id), class_id)
        class_names = sorted(order, key=lambda name: (order[name], name))
        self.default_positive_classes = tuple(n for n in class_names if n in ABNORMAL)
        items = [
            Item(path, class_names.index(name), name, split=split)
            for path, _, name, split in labelled
        ]
        return class_names, items
