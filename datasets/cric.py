"""CRIC Cervix: cropped Pap smear cells in the six Bethesda classes, with 3-way and binary views.

Layout: `ROOT/<class>/*.png`, one folder per Bethesda class (cells cropped around the nucleus
coordinates of the CRIC `classifications.csv`). Folders named like the CSV's `bethesda_system`
values ("Negative for intraepithelial lesion") map through DATASET.CRIC.CLASS_FOLDERS. When
crop file names carry the source image id, DATASET.CRIC.GROUP_PATTERN (a regex whose first
group is the image id) keeps cells of one image on one side of the split.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import (
    DatasetBase,
    DatasetError,
    Item,
    check_choice,
    collect_class_folders,
    parse_name_folders,
    relabel_items,
)
from fewclip.registry import DATASETS

CLASS_NAMES = ["NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]
# view -> (class names, Bethesda class -> view class, positive classes)
VIEWS = {
    "6class": (CLASS_NAMES, {name: name for name in CLASS_NAMES}, CLASS_NAMES[1:]),
    "3class": (  # low grade: ASC-US, LSIL; high grade: ASC-H, HSIL, SCC
        ["normal", "lsil", "hsil"],
        {"NILM": "normal", "ASC-US": "lsil", "LSIL": "lsil"}
        | {name: "hsil" for name in ("ASC-H", "HSIL", "SCC")},
        ["lsil", "hsil"],
    ),
    "binary": (
        ["normal", "abnormal"],
        {name: "normal" if name == "NILM" else "abnormal" for name in CLASS_NAMES},
        ["abnormal"],
    ),
}


@DATASETS.register()
class CRIC(DatasetBase):
    default_prompt_file = "cric.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "CRIC"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.VIEW = "6class"  # "6class" (Bethesda), "3class" (normal/lsil/hsil), "binary"
        # "class=folder" for class folders named otherwise
        node.CLASS_FOLDERS = ["NILM=Negative for intraepithelial lesion"]
        node.GROUP_PATTERN = ""  # regex on the file stem; group 1 = source image id; "" = none
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.CRIC
        view = check_choice(node.VIEW, list(VIEWS), "DATASET.CRIC.VIEW")
        key = "DATASET.CRIC.CLASS_FOLDERS"
        aliases = {folder: name for name, folder in parse_name_folders(node.CLASS_FOLDERS, key)}
        items = collect_class_folders(self.root, CLASS_NAMES, class_folders=aliases, alias_key=key)
        if node.GROUP_PATTERN:
            items = [replace(item, group=self._group(item.path)) for item in items]
        class_names, mapping, positives = VIEWS[view]
        self.default_positive_classes = tuple(positives)
        return list(class_names), relabel_items(items, mapping, class_names)

    def _group(self, path: str) -> str:
        pattern = self.cfg.DATASET.CRIC.GROUP_PATTERN
        try:
            match = re.search(pattern, Path(path).stem)
        except re.error as error:
            message = f"DATASET.CRIC.GROUP_PATTERN {pattern!r} is not a regex: {error}"
            raise DatasetError(message) from None
        if not match or not match.groups():
            raise DatasetError(
                f"DATASET.CRIC.GROUP_PATTERN {pattern!r} finds no group in the name of {path}"
            )
        return match.group(1)
