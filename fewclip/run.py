"""One run (a sweep cell): config -> run folder -> split -> trainer -> evaluation -> results."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from yacs.config import CfgNode

from fewclip.backbones import ClipBundle, build_clip
from fewclip.config import compute_config_hash, config_to_dict
from fewclip.data import DatasetBase, Item
from fewclip.distributed import broadcast_from_main, is_main_process
from fewclip.evaluation import evaluate_set, summarise_targets, validation_score
from fewclip.images import ImageStore, compute_store_items, decoding_seconds
from fewclip.label_map import evaluate_with_label_map, load_label_map
from fewclip.protocol import load_dataset
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
_MODEL_CACHE: dict[tuple[str, str, str], ClipBundle] = {}


def resolve_run_dir(cfg: CfgNode) -> Path:
    """`<OUTPUT_DIR>/<dataset>/<trainer>/<recipe>/shots_<k>[_fraction_<f>]/seed_<s>[_split_<t>]`."""
    if cfg.RUN_DIR:
        return Path(cfg.RUN_DIR)
    seed = f"seed_{cfg.SEED}"
    if cfg.DATASET.SPLIT_SEED != cfg.SEED:
        seed += f"_split_{cfg.DATASET.SPLIT_SEED}"
    shots = f"shots_{cfg.DATASET.NUM_SHOTS}"
    if cfg.DATASET.TRAIN_FRACTION > 0:  # label-efficiency runs: a share of each class
        shots += f"_fraction_{cfg.DATASET.TRAIN_FRACTION:g}"
    return Path(cfg.OUTPUT_DIR) / cfg.DATASET.NAME / cfg.TRAINER.NAME / cfg.RECIPE / shots / seed


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


def build_image_set(
    items: list[Item],
    image_size: int,
    cfg: CfgNode,
    store: ImageStore | None = None,
    in_memory: bool = False,
) -> ImageSet:
    """Decoded images of `items` from the shared store (dropping unreadable ones if configured):
    a view of the memory map, or (`in_memory`, for the small training set) a copy in memory."""
    store = store or ImageStore(items, image_size, cfg.CACHE_DIR or None, cfg.INPUT.STORE_SIZE)
    decoded = store.load(items, cfg.DATASET.SKIP_UNREADABLE, in_memory)
    kept_items = [items[i] for i in decoded.kept]
    return ImageSet(
        images=decoded.images,
        labels=np.array([item.label for item in kept_items], dtype=np.int64),
        centers=[item.center for item in kept_items],
        items=kept_items,
        key=store.key,
        rows=decoded.rows,
        store=decoded.store,
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


def load_cross_dataset(cfg: CfgNode, dataset: DatasetBase):
    """(other dataset, label map) for EVAL.CROSS_DATASET, or None; errors name the classes."""
    if not cfg.EVAL.CROSS_DATASET:
        return None
    if not cfg.EVAL.LABEL_MAP:
        raise ValueError("EVAL.CROSS_DATASET is set but EVAL.LABEL_MAP is empty: declare the map")
    opts = ["CACHE_DIR", cfg.CACHE_DIR, "OUTPUT_DIR", cfg.OUTPUT_DIR, *cfg.EVAL.CROSS_DATASET_OPTS]
    other = load_dataset(cfg.EVAL.CROSS_DATASET, opts)
    return other, load_label_map(cfg.EVAL.LABEL_MAP, dataset.class_names, other.class_names)


class OutputError(OSError):
    """The run folder cannot be written (read-only, missing permission, disk full)."""


MIN_FREE_BYTES = 50 * 2**20  # results, a LoRA checkpoint and a split file fit easily in 50 MiB


def check_output_writable(run_dir: Path) -> None:
    """Fail before any training when the run folder cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"output folder {run_dir} is not writable: {error.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise OutputError(f"output folder {run_dir} has only {free // 2**20} MiB free")


def execute_run(cfg: CfgNode) -> dict[str, Any]:
    """Run one cell unless its results are complete; return its results (or a skip notice)."""
    run_dir = resolve_run_dir(cfg)
    config_hash = compute_config_hash(cfg)
    previous = _complete_results(run_dir, config_hash)
    if previous is not None:
        return previous
    if is_main_process():
        check_output_writable(run_dir)
    lock = cell_lock(run_dir) if is_main_process() else contextlib.nullcontext(True)
    with lock as acquired:
        if not broadcast_from_main(acquired):
            return {"status": "locked", "run_dir": str(run_dir), "skipped": True}
        previous = _complete_results(run_dir, config_hash)  # again: another process may have
        if previous is not None:  # finished the cell between the first check and the lock
            return previous
        if is_main_process():  # under torchrun only rank 0 writes the run's files
            (run_dir / "config.yaml").write_text(cfg.dump())
        return _run_locked(cfg, run_dir, config_hash)


def _complete_results(run_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The cell's complete results as a skip notice, or None; complete results of another
    config are an error (torchrun: rank 0 decides for all)."""
    previous = broadcast_from_main(read_results(run_dir))
    if previous is None or previous.get("status") != COMPLETE:
        return None
    if previous.get("config_hash") != config_hash:
        raise ValueError(
            f"{run_dir} holds complete results of a different config; "
            "set another OUTPUT_DIR or RECIPE name for this variant"
        )
    return {**previous, "skipped": True}


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
        cross = load_cross_dataset(cfg, dataset)  # checked before training: fails early
        trainer = TRAINERS.get(cfg.TRAINER.NAME)(cfg, bundle, dataset, device)
        trainer.run_dir = run_dir  # training state (resume) and TensorBoard log
        tick, decoded_before = time.perf_counter(), decoding_seconds()
        used = [*split.train, *split.val, *split.test, *sum(split.targets.values(), [])]
        # one store for every image this sweep's splits can touch: decoded once, by any cell
        store = ImageStore(
            compute_store_items(dataset.items, used),
            bundle.image_size,
            cfg.CACHE_DIR or None,
            cfg.INPUT.STORE_SIZE,  # training crops and multi-view windows are cut from these
        )
        train = build_image_set(split.train, bundle.image_size, cfg, store, in_memory=True)
        val = build_image_set(split.val, bundle.image_size, cfg, store) if split.val else None
        timings["decode_train_val_seconds"] = time.perf_counter() - tick
        tick = time.perf_counter()
        fit_report = trainer.fit(train, val, validation_score)
        timings["train_seconds"] = time.perf_counter() - tick
        checkpoint = run_dir / "checkpoint.safetensors"
        state = trainer.checkpoint_state()
        if state and is_main_process():
            tmp = checkpoint.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            tmp.replace(checkpoint)
        tick = time.perf_counter()
        test = build_image_set(split.test, bundle.image_size, cfg, store) if split.test else None
        target_sets = {
            center: build_image_set(items, bundle.image_size, cfg, store)
            for center, items in split.targets.items()
        }
        timings["decode_test_seconds"] = time.perf_counter() - tick
        tick = time.perf_counter()
        positives = list(dataset.positive_classes)
        metrics = (
            {
                "test": evaluate_set(
                    trainer,
                    test,
                    positives,
                    cfg.EVAL.ECE_BINS,
                    train,
                    cfg.EVAL.RETRIEVAL,
                )
            }
            if split.test
            else {}
        )
        targets = {
            center: evaluate_set(
                trainer,
                target_sets[center],
                positives,
                cfg.EVAL.ECE_BINS,
                train,
                cfg.EVAL.RETRIEVAL,
            )
            for center in split.targets
        }
        if targets:
            metrics["targets"] = targets
            metrics["targets_summary"] = summarise_targets(targets, HEADLINE)
        if cross is not None:
            cross_dataset, label_map = cross
            cross_set = build_image_set(cross_dataset.items, bundle.image_size, cfg)
            metrics["cross_dataset"] = evaluate_with_label_map(
                trainer, cross_set, label_map, cross_dataset.positive_classes, cfg.EVAL.ECE_BINS
            )
        if test is not None and hasattr(trainer, "save_artifacts") and is_main_process():
            trainer.save_artifacts(run_dir, test)  # e.g. CaM-VLA attention maps
        timings["evaluate_seconds"] = time.perf_counter() - tick
        timings["decoding_seconds"] = decoding_seconds() - decoded_before  # files decoded here
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
            "class_names": list(dataset.class_names),
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
        if is_main_process():
            (run_dir / "traceback.txt").write_text(results["traceback"])
    if is_main_process():
        write_results(run_dir, results)
    return results
