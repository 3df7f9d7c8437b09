"""SIPaKMeD: Pap smear cells in five types (Plissiti et al. 2018), with a 3-way view.

Layout of the release: `ROOT/im_<Type>/` per type (a Kaggle copy nests `im_<Type>/im_<Type>/`),
each with the cluster images `<nnn>.bmp` and the single cells `CROPPED/<nnn>_<kk>.bmp` (the
`.dat` contour files are ignored). DATASET.SIPAKMED.IMAGES picks cells or cluster images. Cells
cut from one cluster image share a group, so one field of view never straddles the split.
"""

from __future__ import annotations

from pathlib import Path

from yacs.config import CfgNode

from fewclip.data import (
    DatasetBase,
    DatasetError,
    Item,
    check_choice,
    list_images,
    relabel_items,
)
from fewclip.registry import DATASETS

CLASS_NAMES = [
    "Superficial-Intermediate",
    "Parabasal",
    "Metaplastic",
    "Koilocytotic",
    "Dyskeratotic",
]
# view -> (class names, type -> view class, positive classes)
VIEWS = {
    "5class": (CLASS_NAMES, {name: name for name in CLASS_NAMES}, ["Koilocytotic", "Dyskeratotic"]),
    "3class": (  # the dataset paper's grouping: normal, benign (metaplastic), abnormal
        ["normal", "benign", "abnormal"],
        {
            "Superficial-Intermediate": "normal",
            "Parabasal": "normal",
            "Metaplastic": "benign",
            "Koilocytotic": "abnormal",
            "Dyskeratotic": "abnormal",
        },
        ["abnormal"],
    ),
}


def type_folder(root: Path, name: str) -> Path:
    """`ROOT/im_<Type>`, or `ROOT/im_<Type>/im_<Type>` when the archive was unpacked twice."""
    folder = root / f"im_{name}"
    if (folder / f"im_{name}").is_dir():
        folder = folder / f"im_{name}"
    if not folder.is_dir():
        raise DatasetError(f"SIPaKMeD type folder {root / f'im_{name}'} does not exist")
    return folder


@DATASETS.register()
class SIPaKMeD(DatasetBase):
    default_prompt_file = "sipakmed.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "SIPAKMED"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.IMAGES = "cropped"  # "cropped" (single cells, CROPPED/) or "full" (cluster images)
        node.VIEW = "5class"  # "5class" (cell types) or "3class" (normal/benign/abnormal)
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.SIPAKMED
        images = check_choice(node.IMAGES, ["cropped", "full"], "DATASET.SIPAKMED.IMAGES")
        view = check_choice(node.VIEW, list(VIEWS), "DATASET.SIPAKMED.VIEW")
        items = []
        for label, name in enumerate(CLASS_NAMES):
            folder = type_folder(self.root, name)
            folder = folder / "CROPPED" if images == "cropped" else folder
            files = list_images(folder) if folder.is_dir() else []
            if not files:
                raise DatasetError(f"class {name!r} folder {folder} has no images")
            for file in files:
                field = file.stem.split("_")[0]  # "001_03" -> cluster image "001"
                items.append(Item(str(file), label, name, group=f"{name}/{field}"))
        class_names, mapping, positives = VIEWS[view]
        self.default_positive_classes = tuple(positives)
        return list(class_names), relabel_items(items, mapping, class_names)
