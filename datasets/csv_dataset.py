"""CSVDataset: a table of images with label and optional center, group, split and mask columns.

Image paths are relative to DATASET.ROOT, or to the CSV's folder when ROOT is empty. Labels are
class names; with DATASET.CLASS_NAMES set they may also be label ids (0, 1, ...).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import DEFAULT_CENTER, DatasetBase, DatasetError, Item
from fewclip.registry import DATASETS

SPLIT_NAMES = {
    "": "",
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


@DATASETS.register()
class CSVDataset(DatasetBase):
    @classmethod
    def config_key(cls) -> str:
        return "CSV"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.FILE = ""  # the CSV file; relative paths are tried under DATASET.ROOT, then as given
        node.PATH_COLUMN = "path"  # image path, relative to ROOT (or the CSV's folder)
        node.LABEL_COLUMN = "label"  # class name (or label id when DATASET.CLASS_NAMES is set)
        node.CENTER_COLUMN = "center"  # optional; missing column or empty cell = "default"
        node.GROUP_COLUMN = "group"  # optional patient/slide id kept whole by the split
        node.SPLIT_COLUMN = "split"  # optional official split: train, val, test
        node.MASK_COLUMN = "mask"  # optional region-of-interest mask path
        node.ABSOLUTE_PATHS = False  # True: paths may be absolute or leave ROOT; False: refused
        return node

    def _image_path(self, value: str, path: Path, line: int) -> Path:
        """ROOT / value; a path that leaves ROOT is refused unless CSV.ABSOLUTE_PATHS."""
        image = Path(os.path.abspath(self.root / value))
        root = Path(os.path.abspath(self.root))
        if not self.cfg.DATASET.CSV.ABSOLUTE_PATHS and not image.is_relative_to(root):
            raise DatasetError(
                f"{path} line {line}: path {value!r} leaves the data folder {root}; set "
                "DATASET.CSV.ABSOLUTE_PATHS True if the table holds paths outside it"
            )
        return image

    def _csv_path(self) -> Path:
        name = self.cfg.DATASET.CSV.FILE
        if not name:
            raise DatasetError("DATASET.CSV.FILE is empty; CSVDataset needs the table of images")
        path = Path(name).expanduser()
        if not path.is_absolute() and self.cfg.DATASET.ROOT:
            under_root = Path(self.cfg.DATASET.ROOT).expanduser() / path
            path = under_root if under_root.is_file() else path
        if not path.is_file():
            raise FileNotFoundError(f"CSV file {path} does not exist (DATASET.CSV.FILE)")
        return Path(os.path.abspath(path))

    def resolve_root(self) -> Path:
        if self.cfg.DATASET.ROOT:
            return super().resolve_root()
        return self._csv_path().parent

    @property
    def split_key(self) -> str:
        return f"{self.name}_{self._csv_path().stem}"

    def load_items(self) -> tuple[list[str], list[Item]]:
        node, path = self.cfg.DATASET.CSV, self._csv_path()
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        columns = set(rows[0]) if rows else set()
        for key in ("PATH_COLUMN", "LABEL_COLUMN"):
            if node[key] not in columns:
                raise DatasetError(
                    f"CSV file {path} has no column {node[key]!r} (DATASET.CSV.{key})"
                )
        raw_labels = [row[node.LABEL_COLUMN].strip() for row in rows]
        class_names = list(self.cfg.DATASET.CLASS_NAMES) or sorted(set(raw_labels))
        items, missing = [], []
        for line, (row, raw) in enumerate(zip(rows, raw_labels), start=2):
            if raw in class_names:
                label = class_names.index(raw)
            elif raw.isdigit() and self.cfg.DATASET.CLASS_NAMES and int(raw) < len(class_names):
                label = int(raw)
            else:
                raise DatasetError(f"{path} line {line}: label {raw!r} is not one of {class_names}")
            split = (row.get(node.SPLIT_COLUMN) or "").strip().lower()
            if split not in SPLIT_NAMES:
                raise DatasetError(f"{path} line {line}: split {split!r} is not train, val or test")
            image = self._image_path(row[node.PATH_COLUMN].strip(), path, line)
            if not image.is_file():
                missing.append(str(image))
            mask = (row.get(node.MASK_COLUMN) or "").strip()
            items.append(
                Item(
                    path=os.path.abspath(image),
                    label=label,
                    class_name=class_names[label],
                    center=(row.get(node.CENTER_COLUMN) or "").strip() or DEFAULT_CENTER,
                    group=(row.get(node.GROUP_COLUMN) or "").strip(),
                    split=SPLIT_NAMES[split],
                    mask=str(self._image_path(mask, path, line)) if mask else "",
                )
            )
        if missing:
            raise DatasetError(
                f"{path}: {len(missing)} listed images do not exist, e.g. {missing[0]}"
            )
        return class_names, items
