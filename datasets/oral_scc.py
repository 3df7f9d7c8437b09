"""OralSCC: H&E oral mucosa, Normal vs oral squamous cell carcinoma, magnification as center.

Layout: one folder per magnification, each holding the class folders:
`ROOT/<center folder>/<class>/*.jpg`. DATASET.ORAL_SCC.CENTERS names them ("center=folder"):
the shared copy is `oral_histopath_100x/{Normal,OSCC}` and `oral_histopath_400x/...`; the
original release (Rahman et al. 2020) nests `First Set/100x Normal Oral Cavity Histopathology`
etc., read through DATASET.ORAL_SCC.CLASS_FOLDERS (see configs/datasets/oral_scc.yaml).
"""

from __future__ import annotations

from yacs.config import CfgNode

from fewclip.data import DatasetBase, Item, collect_center_folders
from fewclip.registry import DATASETS

CLASS_NAMES = ["Normal", "OSCC"]


@DATASETS.register()
class OralSCC(DatasetBase):
    default_prompt_file = "oral_scc.yaml"
    default_positive_classes = ("OSCC",)

    @classmethod
    def config_key(cls) -> str:
        return "ORAL_SCC"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        # "center" or "center=folder" under ROOT; each folder holds the class folders
        node.CENTERS = ["100x=oral_histopath_100x", "400x=oral_histopath_400x"]
        node.CLASS_FOLDERS = []  # "class=folder" for class folders named otherwise
        return node

    def load_items(self) -> tuple[list[str], list[Item]]:
        node = self.cfg.DATASET.ORAL_SCC
        keys = ("DATASET.ORAL_SCC.CENTERS", "DATASET.ORAL_SCC.CLASS_FOLDERS")
        return CLASS_NAMES, collect_center_folders(
            self.root, CLASS_NAMES, node.CENTERS, node.CLASS_FOLDERS, keys
        )
