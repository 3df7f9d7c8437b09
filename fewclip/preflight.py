"""Checks a sweep runs once, after expanding its cells and before the first one: run folders
that two cells would share, and each distinct dataset (and cross-dataset target) parsed once, so
a bad ROOT or label map is one error naming the YAML, not one per cell; every image of each pool
decoded once (DATASET.CHECK_IMAGES), so a corrupt file is found before any training."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from fewclip.config import ConfigError

LOGGER = logging.getLogger(__name__)


def check_run_folders(cells: Sequence[Any], configs: Sequence[CfgNode]) -> None:
    """Two cells (fewclip.sweep.Cell) that would write one run folder are an error naming both
    dataset YAMLs and the fix (e.g. two ImageFolder YAMLs given one DATASET.DISPLAY_NAME),
    before anything runs."""
    from fewclip.run import resolve_run_dir

    seen: dict[Path, Any] = {}
    for cell, cfg in zip(cells, configs):
        run_dir = resolve_run_dir(cfg)
        if run_dir in seen:
            first = seen[run_dir]
            raise ConfigError(
                f"two cells would share the run folder {run_dir}: {first.dataset_config or '-'} "
                f"({first.describe()}) and {cell.dataset_config or '-'} ({cell.describe()}); "
                "give the datasets distinct DATASET.DISPLAY_NAME values (or drop the repeat)"
            )
        seen[run_dir] = cell


# DATASET keys that choose the few shots of a cell, not which items the dataset parses
_SPLIT_ONLY_KEYS = ("NUM_SHOTS", "SPLIT_SEED", "TRAIN_FRACTION", "VAL_SHOTS", "DISPLAY_NAME")


def check_datasets(cells: Sequence[Any], configs: Sequence[CfgNode]) -> None:
    """Parse each distinct dataset (and cross-dataset target with its label map) once, before the
    first cell: a bad ROOT, class or label map is one error naming the YAML, not one per cell."""
    from fewclip.config import config_to_dict
    from fewclip.registry import DATASETS
    from fewclip.run import load_cross_dataset

    checked: set[str] = set()
    seen: set[str] = set()  # image files already decoded by this check
    for cell, cfg in zip(cells, configs):
        data = {k: v for k, v in config_to_dict(cfg.DATASET).items() if k not in _SPLIT_ONLY_KEYS}
        cross = [cfg.EVAL.CROSS_DATASET, cfg.EVAL.LABEL_MAP, list(cfg.EVAL.CROSS_DATASET_OPTS)]
        key = json.dumps([cfg.CACHE_DIR, data, cross], sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        where = cell.dataset_config or cfg.DATASET.NAME
        try:
            dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
            cross = load_cross_dataset(cfg, dataset)
        except Exception as error:  # the one message for every cell of this dataset
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"dataset {where}: {message}") from None
        if cfg.DATASET.CHECK_IMAGES:
            items = [*dataset.items, *(cross["items"] if cross else [])]
            check_images([item.path for item in items], where, cfg.DATASET.SKIP_UNREADABLE, seen)


def check_images(paths: Sequence[str], where: str, skip_unreadable: bool, seen: set[str]) -> None:
    """Decode every file of a dataset's pool not decoded yet: an unreadable one is an error
    naming it (and how many there are) before the first cell, or, with SKIP_UNREADABLE, one
    warning per file (the runs leave them out and count them)."""
    from fewclip.data import find_unreadable

    todo = sorted(set(paths) - seen)
    started = time.perf_counter()
    problems = find_unreadable(todo)
    seen.update(todo)
    LOGGER.info(
        "dataset %s: decoded %d images in %.1f s, %d unreadable (DATASET.CHECK_IMAGES)",
        where,
        len(todo),
        time.perf_counter() - started,
        len(problems),
    )
    if problems and not skip_unreadable:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(
            f"dataset {where}: {problems[0]}{more}; remove or replace the file(s), or set "
            "DATASET.SKIP_UNREADABLE True to leave them out (each is warned and counted)"
        )
    for problem in problems:
        LOGGER.warning(
            "dataset %s: %s: it will be left out (DATASET.SKIP_UNREADABLE)", where, problem
        )


def check_output_root(root: Path) -> None:
    """The sweep's output folder can be created and written (checked on its nearest existing
    folder, so a dry run creates nothing): one line before any work, not an OSError mid-sweep."""
    import os

    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output folder {root}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output folder {root} is not writable ({existing} is read-only): set OUTPUT_DIR to a"
            " folder you can write"
        )


def check_previous_results(configs: Sequence[CfgNode]) -> None:
    """A cell whose run folder holds complete results of a different config is an error naming
    the folder and the keys that differ, before any cell runs (the run would refuse it anyway)."""
    from fewclip.config import compute_config_hash, config_to_dict
    from fewclip.results import COMPLETE, read_results
    from fewclip.run import resolve_run_dir

    for cfg in configs:
        run_dir = resolve_run_dir(cfg)
        previous = read_results(run_dir)
        if not previous or previous.get("status") != COMPLETE:
            continue
        if previous.get("config_hash") == compute_config_hash(cfg):
            continue
        differing = _differing_keys(previous.get("config") or {}, config_to_dict(cfg))
        keys = ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
        raise ConfigError(
            f"{run_dir} holds complete results of a different config ({keys or 'same keys'}):"
            " set another OUTPUT_DIR, or RECIPE to name this variant, or delete that folder"
        )


def _differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
