"""Cross-center protocol helpers: leave-one-center-out folds for a sweep.

Sources, targets and the few-shot sampling per class or per class and center are config keys
(DATASET.SOURCE_CENTERS, TARGET_CENTERS, SHOTS_PER; see fewclip/splits.py). A leave-one-center-
out sweep is one cell per center: train (and test in-domain) on every other center, evaluate
on all images of the held-out one.
"""

from __future__ import annotations

from collections.abc import Sequence

from fewclip.config import build_config
from fewclip.data import DatasetBase, DatasetError
from fewclip.registry import DATASETS


def expand_leave_one_center_out(
    centers: Sequence[str], recipe_name: str | None = None
) -> list[list[str]]:
    """One `KEY VALUE` opts list per center, holding that center out as the target.

    Lists are written as Python literals ("['a', 'b']") so center names with commas or spaces
    survive the opts parser. With `recipe_name`, each fold also sets RECIPE to
    "<recipe_name>-loco_<center>", so the folds of one recipe get separate run folders.
    """
    names = [str(center) for center in centers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"leave-one-center-out: centers repeated: {', '.join(repeated)}")
    if len(names) < 2:
        raise DatasetError(f"leave-one-center-out needs at least 2 centers, got {names or 'none'}")
    folds = []
    for held_out in names:
        sources = [name for name in names if name != held_out]
        opts = [
            "DATASET.SOURCE_CENTERS",
            repr(sources),
            "DATASET.TARGET_CENTERS",
            repr([held_out]),
        ]
        if recipe_name is not None:
            opts += ["RECIPE", f"{recipe_name}-loco_{held_out}"]
        folds.append(opts)
    return folds


def load_dataset(dataset_config: str, opts: Sequence[str] = ()) -> DatasetBase:
    """The dataset of a dataset YAML plus `KEY VALUE` opts (e.g. the target of a cross-dataset
    evaluation, or the centers of a leave-one-center-out sweep)."""
    cfg = build_config(None, dataset_config, list(opts))
    return DATASETS.get(cfg.DATASET.NAME)(cfg)


def load_dataset_centers(dataset_config: str, opts: Sequence[str] = ()) -> list[str]:
    """The centers a dataset YAML (plus opts) reads, by parsing the dataset once."""
    return list(load_dataset(dataset_config, opts).centers)
