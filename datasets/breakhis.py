"""BreaKHis: breast tumour H&E images, 8 subtypes or benign/malignant, magnification as center.

Layout of the release: `ROOT/.../SOB_<B|M>_<type>-<year>-<slide>-<mag>-<index>.png` anywhere
under ROOT (`histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient>/<mag>X/`); the
label, magnification and patient come from the file name, so flattened copies read the same.
Each patient is a group: no patient straddles train and test. Across magnification centers the
same patients appear: a 40X -> 400X run measures the magnification shift, not a new population.
"""

from __future__ import annotations

import re

from yacs.config import CfgNode

from fewclip.data import DatasetBase, DatasetError, Item, check_choice, find_images, relabel_items
from fewclip.registry import DATASETS

SUBTYPES = {  # code in the file name -> class name
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
CLASS_NAMES = list(SUBTYPES.values())
MALIGNANT = CLASS_NAMES[4:]
VIEWS = {
    "subtype": (CLASS_NAMES, {name: name for name in CLASS_NAMES}, MALIGNANT),
    "binary": (
        ["benign", "malignant"],
        {name: "malignant" if name in MALIGNANT else "benign" for name in CLASS_NAMES},
        ["malignant"],
    ),
}
NAME_PATTERN = re.compile(r"^SOB_([BM])_([A-Z]+)-(\d+)-([0-9A-Za-z]+)-(\d+)-(\d+)$")


@DATASETS.register()
class BreaKHis(DatasetBase):
    default_prompt_file = "breakhis.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "BREAKHIS"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.VIEW = "subtype"  # "subtype" (8 classes) or "binary" (benign/malignant)
        node.MAGNIFICATIONS = ["40X", "100X", "200X", "400X"]  # centers to read
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.BREAKHIS
        view = check_choice(node.VIEW, list(VIEWS), "DATASET.BREAKHIS.VIEW")
        wanted = [str(m).upper() for m in node.MAGNIFICATIONS]
        items = []
        for path in find_images(self.root):
            match = NAME_PATTERN.match(path.stem)
            if not match:
                raise DatasetError(
                    f"image {path} does not follow the BreaKHis name pattern "
                    "SOB_<B|M>_<type>-<year>-<slide>-<magnification>-<index>"
                )
            tumour, code, year, slide, magnification = match.groups()[:5]
            if code not in SUBTYPES or (tumour == "M") != (SUBTYPES[code] in MALIGNANT):
                raise DatasetError(f"image {path}: unknown or inconsistent tumour type {code!r}")
            center = f"{magnification}X"
            if center in wanted:
                name = SUBTYPES[code]
                group = f"{year}-{slide}"
                items.append(Item(str(path), CLASS_NAMES.index(name), name, center, group))
        absent = [m for m in wanted if not any(item.center == m for item in items)]
        if absent:
            raise DatasetError(
                f"no BreaKHis images at magnification {', '.join(absent)} under {self.root}"
            )
        class_names, mapping, positives = VIEWS[view]
        self.default_positive_classes = tuple(positives)
        return list(class_names), relabel_items(items, mapping, class_names)
