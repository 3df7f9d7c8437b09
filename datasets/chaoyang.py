"""Chaoyang: colon H&E patches (512x512) in four classes, with the official train/test split.

Layout of the release: `ROOT/train/*.JPG`, `ROOT/test/*.JPG` and the label files
`ROOT/train.json`, `ROOT/test.json`, each a JSON list of {"name": "train/<file>", "label": id}
with ids 0 normal, 1 serrated, 2 adenocarcinoma, 3 adenoma (majority vote of pathologists).
Validation images are carved out of the official training part by the split seed.
"""

from __future__ import annotations

import json
import os

from yacs.config import CfgNode

from fewclip.data import DatasetBase, DatasetError, Item
from fewclip.registry import DATASETS

CLASS_NAMES = ["normal", "serrated", "adenocarcinoma", "adenoma"]


@DATASETS.register()
class Chaoyang(DatasetBase):
    default_prompt_file = "chaoyang.yaml"
    default_positive_classes = ("adenocarcinoma",)

    @classmethod
    def config_key(cls) -> str:
        return "CHAOYANG"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.TRAIN_JSON = "train.json"  # label file of the official training part, in ROOT
        node.TEST_JSON = "test.json"  # label file of the official test part, in ROOT
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.CHAOYANG
        items = []
        for split, name in (("train", node.TRAIN_JSON), ("test", node.TEST_JSON)):
            items.extend(self._read(name, split))
        return CLASS_NAMES, items

    def _read(self, name: str, split: str) -> list[Item]:
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(f"Chaoyang label file {path} does not exist")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"Chaoyang label file {path} is not valid JSON: {error}") from None
        if not isinstance(entries, list):
            raise DatasetError(f"Chaoyang label file {path} must hold a list of entries")
        items, missing = [], []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or "name" not in entry or "label" not in entry:
                raise DatasetError(f"{path} entry {index} needs 'name' and 'label': {entry!r}")
            label = entry["label"]
            if not isinstance(label, int) or not 0 <= label < len(CLASS_NAMES):
                raise DatasetError(f"{path} entry {index}: label {label!r} is not 0..3")
            image = self.root / entry["name"]
            if not image.is_file():
                missing.append(str(image))
            items.append(Item(os.path.abspath(image), label, CLASS_NAMES[label], split=split))
        if missing:
            raise DatasetError(
                f"{path}: {len(missing)} listed images do not exist, e.g. {missing[0]}"
            )
        return items
