"""CervicalOCT: multi-center cervical OCT B-scans in five classes (the SAVLT / PAM layout).

Layout: `ROOT/<center>/images/<class>/*` per center (e.g. a mixed training center and two
external hospitals), optional tissue masks `ROOT/<center>/masks/<class folder>/<same stem>.*`.
Class folders named otherwise in a center map through DATASET.CERVICAL_OCT.CLASS_FOLDERS; any
other folder, or a class missing in one center, is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import (
    DatasetBase,
    Item,
    collect_center_folders,
    list_images,
    parse_name_folders,
)
from fewclip.registry import DATASETS

CLASS_NAMES = [
    "cancer",
    "cyst",
    "ectropion",
    "high-grade squamous intraepithelial lesion",
    "mild inflammation",
]
HIGH_RISK = ("cancer", "high-grade squamous intraepithelial lesion")


@DATASETS.register()
class CervicalOCT(DatasetBase):
    default_prompt_file = "cervical_oct.yaml"
    default_positive_classes = HIGH_RISK

    @classmethod
    def config_key(cls) -> str:
        return "CERVICAL_OCT"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.CENTERS = ["mixed", "huaxi", "xiangya"]  # "center" or "center=folder" under ROOT
        node.IMAGES_FOLDER = "images"  # inside each center folder: the class folders
        node.MASKS_FOLDER = "masks"  # inside each center folder: optional masks (same stems)
        node.CLASS_FOLDERS = []  # "class=folder" for class folders named otherwise
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.CERVICAL_OCT
        keys = ("DATASET.CERVICAL_OCT.CENTERS", "DATASET.CERVICAL_OCT.CLASS_FOLDERS")
        items = collect_center_folders(
            self.root, CLASS_NAMES, node.CENTERS, node.CLASS_FOLDERS, keys, node.IMAGES_FOLDER
        )
        folders = dict(parse_name_folders(node.CENTERS, keys[0]))
        masks: dict[tuple[str, str, str], str] = {}
        for center, folder in folders.items():
            mask_root = self.root / folder / node.MASKS_FOLDER
            if node.MASKS_FOLDER and mask_root.is_dir():
                for class_folder in mask_root.iterdir():
                    if class_folder.is_dir():
                        for mask in list_images(class_folder):
                            masks[(center, class_folder.name, mask.stem)] = str(mask)
        return CLASS_NAMES, [
            Item(
                item.path,
                item.label,
                item.class_name,
                item.center,
                mask=masks.get(
                    (item.center, Path(item.path).parent.name, Path(item.path).stem), ""
                ),
            )
            for item in items
        ]
