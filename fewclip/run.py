"""One run (a sweep cell): config -> run folder -> split -> trainer -> evaluation -> results."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from yacs.config import CfgNode

from fewclip.backbones import ClipBundle, build_clip
from fewclip.config import config_to_dict
from fewclip.data import DatasetBase, Item
from fewclip.evaluation import evaluate_set, summarise_targets, validation_score
from fewclip.images import compute_image_key, load_image_array
from fewclip.registry import DATASETS, TRAINERS
from fewclip.results import (
    COMPLETE,
    DIVERGED,
    FAILED,
    collect_provenance,
    read_results,
    write_results,
)
from fewclip.splits import build_split
from fewclip.trainer import DivergedError, ImageSet

LOGGER = logging.getLogger(__name__)
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
# Keys that say where or how verbosely a run writes, not what it computes.
NON_SEMANTIC_KEYS = ("OUTPUT_DIR", "RUN_DIR", "VERBOSE", "CACHE_DIR", "PLUGINS")
_MODEL_CACHE: dict[tuple[str, str, str], ClipBundle] = {}


def resolve_run_dir(cfg: CfgNode) -> Path:
    """`<OUTPUT_DIR>/<dataset>/<trainer>/<recipe>/shots_<k>/seed_<s>[_split_<t>]`."""
    if cfg.RUN_DIR:
        return Path(cfg.RUN_DIR)
    seed = f"seed_{cfg.SEED}"
    if cfg.DATASET.SPLIT_SEED != cfg.SEED:
        seed += f"_split_{cfg.DATASET.SPLIT_SEED}"
    return (
        Path(cfg.OUTPUT_DIR)
        / cfg.DATASET.NAME
        / cfg.TRAINER.NAME
        / cfg.RECIPE
        / f"shots_{cfg.DATASET.NUM_SHOTS}"
        / seed
    )


def compute_config_hash(cfg: CfgNode) -> str:
    """Hash of everything that changes what a run computes (not where it writes)."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in NON_SEMANTIC_KEYS}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_clip(cfg: CfgNode) -> ClipBundle:
    """A fresh copy of the backbone; the pristine one stays loaded for the worker's next run."""
    key = (cfg.MODEL.NAME, cfg.MODEL.PRETRAINED, cfg.MODEL.HF_HUB)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = build_clip(cfg.MODEL)
    pristine = _MODEL_CACHE[key]
    return (
        copy.replace(pristine, model=copy.deepcopy(pristine.model))
        if hasattr(copy, "replace")
        else ClipBundle(**{**pristine.__dict__, "model": copy.deepcopy(pristine.model)})
    )


def build_image_set(items: list[Item], image_size: int, cfg: CfgNode) -> ImageSet:
    """Decoded images of `items` from the shared cache (dropping unreadable ones if configured)."""
    array, kept = load_image_array(items, image_size, cfg.CACHE_DIR, cfg.DATASET.SKIP_UNREADABLE)
    kept_items = [items[i] for i in kept]
    return ImageSet(
        images=array,
        labels=np.array([item.label for item in kept_items], dtype=np.int64),
        centers=[item.center for item in kept_items],
        paths=[item.path for item in kept_items],
        key=compute_image_key(items, image_size),
    )


@contextlib.contextmanager
def cell_lock(run_dir: Path):
    """Exclusive, non-blocking lock on the cell; yields False when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute_run(cfg: CfgNode) -> dict[str, Any]:
    """Run one cell unless its results are complete; return its results (or a skip notice)."""
    run_dir = resolve_run_dir(cfg)
    config_hash = compute_config_hash(cfg)
    previous = read_results(run_dir)
    if previous is not None and previous.get("status") == COMPLETE:
        if previous.get("config_hash") != config_hash:
            raise ValueError(
                f"{run_dir} holds complete results of a different config; "
                "set another OUTPUT_DIR or RECIPE name for this variant"
            )
        return {**previous, "skipped": True}
    with cell_lock(run_dir) as acquired:
        if not acquired:
            return {"status": "locked", "run_dir": str(run_dir), "skipped": True}
        (run_dir / "config.yaml").write_text(cfg.dump())
        return _run_locked(cfg, run_dir, config_hash)


def _run_locked(cfg: CfgNode, run_dir: Path, config_hash: str) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    base = {
        "config": config_to_dict(cfg),
        "config_hash": config_hash,
        "run_dir": str(run_dir),
        "provenance": collect_provenance(),
    }
    try:
        dataset: DatasetBase = DATASETS.get(cfg.DATASET.NAME)(cfg)
        split = build_split(dataset, cfg)
        timings["data_seconds"] = time.perf_counter() - started
        bundle = load_clip(cfg)
        device = select_device(cfg.DEVICE)
        trainer = TRAINERS.get(cfg.TRAINER.NAME)(cfg, bundle, dataset, device)
        tick = time.perf_counter()
        train = build_image_set(split.train, bundle.image_size, cfg)
        val = build_image_set(split.val, bundle.image_size, cfg) if split.val else None
        timings["decode_train_val_seconds"] = time.perf_counter() - tick
        tick = time.perf_counter()
        fit_report = trainer.fit(train, val, validation_score)
        timings["train_seconds"] = time.perf_counter() - tick
        checkpoint = run_dir / "checkpoint.safetensors"
        state = trainer.checkpoint_state()
        if state:
            tmp = checkpoint.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            tmp.replace(checkpoint)
        tick = time.perf_counter()
        positives = list(dataset.positive_classes)
        metrics = (
            {
                "test": evaluate_set(
                    trainer,
                    build_image_set(split.test, bundle.image_size, cfg),
                    positives,
                    cfg.EVAL.ECE_BINS,
                )
            }
            if split.test
            else {}
        )
        targets = {
            center: evaluate_set(
                trainer,
                build_image_set(items, bundle.image_size, cfg),
                positives,
                cfg.EVAL.ECE_BINS,
            )
            for center, items in split.targets.items()
        }
        if targets:
            metrics["targets"] = targets
            metrics["targets_summary"] = summarise_targets(targets, HEADLINE)
        timings["evaluate_seconds"] = time.perf_counter() - tick
        timings["total_seconds"] = time.perf_counter() - started
        results = {
            **base,
            "status": COMPLETE,
            "metrics": metrics,
            "training": {**fit_report, **trainer.report},
            "split": {
                "file": str(split.path),
                "sha1": split.sha1,
                "num_train": len(train),
                "num_val": len(val) if val is not None else 0,
            },
            "weights": bundle.identity,
            "timings": timings,
        }
    except DivergedError as error:
        results = {**base, "status": DIVERGED, "diverged_step": error.step, "error": str(error)}
    except Exception as error:  # the cell fails, the sweep goes on; the trace is kept
        results = {
            **base,
            "status": FAILED,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
        (run_dir / "traceback.txt").write_text(results["traceback"])
    write_results(run_dir, results)
    return results
