"""One run (a sweep cell): config -> run folder -> split -> trainer -> evaluation -> results."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
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
from fewclip.images import (
    ImageStore,
    compute_files_key,
    compute_store_items,
    decoding_seconds,
)
from fewclip.label_map import evaluate_with_label_map, load_label_map, select_target_items
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
    """`<OUTPUT_DIR>/<dataset>/<trainer>/<recipe>/shots_<k>[_fraction_<f>]/seed_<s>[_split_<t>]`,
    <dataset> being DATASET.DISPLAY_NAME."""
    if cfg.RUN_DIR:
        return Path(cfg.RUN_DIR)
    seed = f"seed_{cfg.SEED}"
    if cfg.DATASET.SPLIT_SEED != cfg.SEED:
        seed += f"_split_{cfg.DATASET.SPLIT_SEED}"
    shots = f"shots_{cfg.DATASET.NUM_SHOTS}"
    if cfg.DATASET.TRAIN_FRACTION > 0:  # label-efficiency runs: a share of each class
        shots += f"_fraction_{cfg.DATASET.TRAIN_FRACTION:g}"
    dataset = cfg.DATASET.get("DISPLAY_NAME") or cfg.DATASET.NAME
    return Path(cfg.OUTPUT_DIR) / dataset / cfg.TRAINER.NAME / cfg.RECIPE / shots / seed


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
    skipped: list[str] | None = None,
) -> ImageSet:
    """Decoded images of `items` from the shared store (dropping unreadable ones if configured,
    each warned and appended to `skipped`): a view of the memory map, or (`in_memory`, for the
    small training set) a copy in memory."""
    store = store or ImageStore(items, image_size, cfg.CACHE_DIR or None, cfg.INPUT.STORE_SIZE)
    decoded = store.load(items, cfg.DATASET.SKIP_UNREADABLE, in_memory)
    kept_items = [items[i] for i in decoded.kept]
    if len(kept_items) < len(items):
        kept_set = set(decoded.kept)
        for index in (i for i in range(len(items)) if i not in kept_set):
            LOGGER.warning(
                "skipping unreadable image %s (DATASET.SKIP_UNREADABLE)", items[index].path
            )
            if skipped is not None:
                skipped.append(items[index].path)
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
    """Exclusive, non-blocking lock on the cell; yields False when another process holds it.

    run.lock is removed when the run ends (while still locked). A process that opened the file
    just before the removal finds its lock on a deleted file and takes a fresh one, so two runs
    never hold one cell."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    while True:
        handle = open(path, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            yield False
            return
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # locked a file another run removed: lock the one now at the path
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def load_cross_dataset(cfg: CfgNode, dataset: DatasetBase) -> dict[str, Any] | None:
    """EVAL.CROSS_DATASET's dataset, label map and items (its `drop`ped classes left out and
    counted), or None; errors name the classes. Checked before training: it fails early."""
    if not cfg.EVAL.CROSS_DATASET:
        return None
    if not cfg.EVAL.LABEL_MAP:
        raise ValueError("EVAL.CROSS_DATASET is set but EVAL.LABEL_MAP is empty: declare the map")
    opts = ["CACHE_DIR", cfg.CACHE_DIR, "OUTPUT_DIR", cfg.OUTPUT_DIR, *cfg.EVAL.CROSS_DATASET_OPTS]
    other = load_dataset(cfg.EVAL.CROSS_DATASET, opts)
    label_map = load_label_map(cfg.EVAL.LABEL_MAP, dataset.class_names, other.class_names)
    items, dropped = select_target_items(other.items, label_map)
    if dropped:
        counts = ", ".join(f"{count} {name}" for name, count in dropped.items())
        LOGGER.warning("cross-dataset %s: label map drops %s images", other.root, counts)
    if not items:
        raise ValueError(f"cross-dataset {cfg.EVAL.CROSS_DATASET}: no images left after drop")
    return {
        "dataset": other,
        "label_map": label_map,
        "items": items,
        "block": {
            "dataset": other.cfg.DATASET.get("DISPLAY_NAME") or other.name,
            "dataset_config": str(cfg.EVAL.CROSS_DATASET),
            "root": str(other.root),
            "class_names": list(label_map.target_classes),
            "dropped": {"classes": list(dropped), "images": dropped},
        },
    }


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


def execute_run(cfg: CfgNode, decode_all: bool = True) -> dict[str, Any]:
    """Run one cell unless its results are complete; return its results (or a skip notice).

    decode_all: decode every image the sweep's splits can touch on first use (a sweep), or
    False (a one-off run) only the images this run reads; the store and its key are the same."""
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
        return _run_locked(cfg, run_dir, config_hash, decode_all)


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


def _run_locked(
    cfg: CfgNode, run_dir: Path, config_hash: str, decode_all: bool = True
) -> dict[str, Any]:
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
            decode_all,
        )
        skipped: dict[str, list[str]] = {}  # eval set -> unreadable files left out
        train = build_image_set(
            split.train, bundle.image_size, cfg, store, True, skipped.setdefault("train", [])
        )
        val = (
            build_image_set(
                split.val, bundle.image_size, cfg, store, False, skipped.setdefault("val", [])
            )
            if split.val
            else None
        )
        timings["decode_train_val_seconds"] = time.perf_counter() - tick
        # test and target images before training: an unreadable one stops the run now,
        # not after it has trained (their rows are views of the store, not copies)
        tick = time.perf_counter()
        test = (
            build_image_set(
                split.test, bundle.image_size, cfg, store, False, skipped.setdefault("test", [])
            )
            if split.test
            else None
        )
        target_sets = {
            center: build_image_set(
                items,
                bundle.image_size,
                cfg,
                store,
                False,
                skipped.setdefault(f"target:{center}", []),
            )
            for center, items in split.targets.items()
        }
        timings["decode_test_seconds"] = time.perf_counter() - tick
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
            label_map = cross["label_map"]
            kept = [c for c in cross["dataset"].positive_classes if c not in label_map.dropped]
            cross_files = skipped.setdefault(f"cross:{cross['block']['dataset']}", [])
            cross_set = build_image_set(
                cross["items"], bundle.image_size, cfg, None, False, cross_files
            )
            metrics["cross_dataset"] = {
                **cross["block"],
                **evaluate_with_label_map(trainer, cross_set, label_map, kept, cfg.EVAL.ECE_BINS),
            }
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
                # the split's image files as read (an image rewritten in place changes it)
                "files_key": compute_files_key(used),
                "num_train": len(train),
                "num_val": len(val) if val is not None else 0,
            },
            "weights": bundle.identity,
            "class_names": list(dataset.class_names),
            "skipped_unreadable": {
                "count": sum(len(files) for files in skipped.values()),
                "by_set": {name: len(files) for name, files in skipped.items() if files},
                "files": sorted({path for files in skipped.values() for path in files}),
            },
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
