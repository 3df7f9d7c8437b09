"""LungHist700: lung H&E images, normal / adenocarcinoma / squamous cell carcinoma (3 classes,
or 7 with the differentiation grade), at 20x and 40x (magnification as center).

Layout of the release: `ROOT/images/<class>/<name>.jpg` with names `<aca|scc>_<bd|md|pd>_<20x|40x>_
<id>.jpg` and `nor_<20x|40x>_<id>.jpg` (bd/md/pd: well, moderately, poorly differentiated),
found anywhere under ROOT, plus `ROOT/data.csv` (superclass, subclass, resolution, image_id,
patient_id). Patients are groups: no patient straddles train and test. Without data.csv there
are no patient groups and a warning says so.
"""

from __future__ import annotations

import logging
import re

from yacs.config import CfgNode

from fewclip.data import (
    DatasetBase,
    DatasetError,
    Item,
    check_choice,
    find_images,
    load_table,
    relabel_items,
)
from fewclip.registry import DATASETS

LOGGER = logging.getLogger(__name__)
GRADES = {"bd": "well", "md": "moderately", "pd": "poorly"}
TUMOURS = {"aca": "adenocarcinoma", "scc": "squamous_cell_carcinoma"}
FINE_CLASSES = ["normal"] + [
    f"{tumour}_{grade}_differentiated" for tumour in TUMOURS.values() for grade in GRADES.values()
]
COARSE_CLASSES = ["normal", *TUMOURS.values()]
VIEWS = {
    "3class": (
        COARSE_CLASSES,
        {
            name: next((t for t in COARSE_CLASSES if name.startswith(t)), name)
            for name in FINE_CLASSES
        },
        COARSE_CLASSES[1:],
    ),
    "7class": (FINE_CLASSES, {name: name for name in FINE_CLASSES}, FINE_CLASSES[1:]),
}
NAME_PATTERN = re.compile(r"^(aca|scc|nor)(?:_(bd|md|pd))?_(20x|40x)_(\d+)$")


def _number(text: str) -> str:
    """ "12", "012" and "12.0" (spreadsheet tools) -> "12"; other text unchanged."""
    try:
        return str(int(float(text)))
    except ValueError:
        return text.strip()


def fine_class(superclass: str, subclass: str) -> str:
    """("aca", "bd") -> "adenocarcinoma_well_differentiated"; ("nor", "") -> "normal"."""
    if superclass == "nor":
        return "normal"
    return f"{TUMOURS[superclass]}_{GRADES[subclass]}_differentiated"


@DATASETS.register()
class LungHist700(DatasetBase):
    default_prompt_file = "lunghist700.yaml"

    @classmethod
    def config_key(cls) -> str:
        return "LUNGHIST700"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.VIEW = "3class"  # "3class" (normal/aca/scc) or "7class" (with differentiation)
        node.RESOLUTIONS = ["20x", "40x"]  # magnifications to read (the centers)
        node.TABLE = "data.csv"  # metadata with patient_id, in ROOT; read when present
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.LUNGHIST700
        view = check_choice(node.VIEW, list(VIEWS), "DATASET.LUNGHIST700.VIEW")
        patients = self._patients()
        wanted = [str(r).lower() for r in node.RESOLUTIONS]
        items = []
        for path in find_images(self.root):
            match = NAME_PATTERN.match(path.stem)
            if not match:
                raise DatasetError(
                    f"image {path} does not follow the LungHist700 name pattern "
                    "<aca|scc>_<bd|md|pd>_<20x|40x>_<id> or nor_<20x|40x>_<id>"
                )
            superclass, subclass, resolution, image_id = match.groups()
            if superclass != "nor" and not subclass:
                raise DatasetError(f"image {path} has no differentiation grade (bd, md or pd)")
            if resolution not in wanted:
                continue
            key = (superclass, subclass or "", resolution, _number(image_id))
            if patients is not None and key not in patients:
                raise DatasetError(f"image {path} has no row in {node.TABLE} (no patient id)")
            name = fine_class(superclass, subclass or "")
            group = patients[key] if patients is not None else ""
            items.append(Item(str(path), FINE_CLASSES.index(name), name, resolution, group))
        class_names, mapping, positives = VIEWS[view]
        self.default_positive_classes = tuple(positives)
        return list(class_names), relabel_items(items, mapping, class_names)

    def _patients(self) -> dict[tuple[str, str, str, str], str] | None:
        name = self.cfg.DATASET.LUNGHIST700.TABLE
        path = self.root / name
        if not name or not path.is_file():
            LOGGER.warning(
                "LungHist700: no %s in %s; splits are not patient-aware", name, self.root
            )
            return None
        columns = ["superclass", "subclass", "resolution", "image_id", "patient_id"]
        patients = {}
        for row in load_table(path, columns):
            subclass = "" if row["subclass"].lower() in ("", "nan") else row["subclass"].lower()
            resolution = row["resolution"].lower()
            key = (row["superclass"].lower(), subclass, resolution, _number(row["image_id"]))
            patients[key] = f"patient-{_number(row['patient_id'])}"
        return patients
