"""Few-shot splits: which images train, validate and test one run, saved as a reusable JSON file.

The val/test partition depends on the split seed only (not on the number of shots), so every
shot count of one seed is tested on the same images; the k shots of a class are the first k of a
per-class shuffle, so smaller shot sets are subsets of larger ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from fewclip.config import get_cfg_defaults
from fewclip.data import DatasetBase, Item
from fewclip.shots import SplitError, sample_few_shot, sample_fraction

SPLIT_FORMAT = 1
OPTION_KEYS = (
    "SHOTS_PER",
    "INSUFFICIENT_SHOTS",
    "VAL_SHOTS",
    "VAL_FRACTION",
    "TEST_FRACTION",
    "SOURCE_CENTERS",
    "TARGET_CENTERS",
)


@dataclass
class Split:
    train: list[Item]
    val: list[Item]
    test: list[Item]
    targets: dict[str, list[Item]]  # target center -> all its items
    path: Path  # the split file
    sha1: str  # sha1 of the split file's bytes


def partition_groups(
    items: Sequence[Item], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Item], list[Item], list[Item]]:
    """Split items into (train, val, test), keeping each group (Item.group) in one part.

    Items without a group are their own group. Groups are stratified by the (majority label,
    majority center) of their items; in each stratum `round(n * fraction)` groups go to test and
    to val (at least one each when the fraction > 0 and the stratum has 3 or more groups), and
    train keeps at least one group.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise SplitError(
            f"DATASET.VAL_FRACTION ({val_fraction}) and TEST_FRACTION ({test_fraction}) must be "
            ">= 0 and sum to less than 1"
        )
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.group or f"item:{item.path}"].append(item)
    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for name, members in groups.items():
        label = min(Counter(m.label for m in members).most_common(), key=lambda x: (-x[1], x[0]))[0]
        center = min(Counter(m.center for m in members).most_common(), key=lambda x: (-x[1], x[0]))[
            0
        ]
        strata[(label, center)].append(name)
    parts: tuple[list[Item], list[Item], list[Item]] = ([], [], [])
    for (label, center), names in sorted(strata.items()):
        names = sorted(names)
        random.Random(f"{seed}:partition:{label}/{center}").shuffle(names)
        count = len(names)
        sizes = [round(count * test_fraction), round(count * val_fraction)]
        for index, fraction in enumerate((test_fraction, val_fraction)):
            if fraction > 0 and sizes[index] == 0 and count >= 3:
                sizes[index] = 1
        while sizes[0] + sizes[1] >= count and sizes[0] + sizes[1] > 0:
            sizes[0 if sizes[0] >= sizes[1] else 1] -= 1
        test_names, val_names = names[: sizes[0]], names[sizes[0] : sizes[0] + sizes[1]]
        for part, chosen in ((parts[2], test_names), (parts[1], val_names)):
            for name in chosen:
                part.extend(groups[name])
        for name in names[sizes[0] + sizes[1] :]:
            parts[0].extend(groups[name])
    return tuple(sorted(part, key=lambda item: item.path) for part in parts)  # type: ignore[return-value]


def choose_centers(dataset: DatasetBase, cfg: CfgNode) -> tuple[list[str], list[str]]:
    """(source centers, target centers) from DATASET.SOURCE_CENTERS / TARGET_CENTERS."""
    sources, targets = list(cfg.DATASET.SOURCE_CENTERS), list(cfg.DATASET.TARGET_CENTERS)
    for key, names in (("SOURCE_CENTERS", sources), ("TARGET_CENTERS", targets)):
        unknown = [name for name in names if name not in dataset.centers]
        if unknown:
            raise SplitError(
                f"DATASET.{key} names centers {', '.join(unknown)} that {dataset.name} does not "
                f"have; its centers are {', '.join(dataset.centers)}"
            )
    both = sorted(set(sources) & set(targets))
    if both:
        raise SplitError(f"centers {', '.join(both)} are in both SOURCE_CENTERS and TARGET_CENTERS")
    sources = sources or [center for center in dataset.centers if center not in targets]
    if not sources:
        raise SplitError("every center is a target center; no center is left to train on")
    return sources, targets


def draw_split(
    dataset: DatasetBase, cfg: CfgNode
) -> tuple[list[Item], list[Item], list[Item], dict[str, list[Item]]]:
    """(train, val, test, targets) for the config; official splits are used when present."""
    data = cfg.DATASET
    sources, targets = choose_centers(dataset, cfg)
    source_items = [item for item in dataset.items if item.center in sources]
    official = [item for item in source_items if item.split]
    if official and len(official) != len(source_items):
        raise SplitError(
            f"{dataset.name}: {len(source_items) - len(official)} source images have no official "
            "split while others have one; give every image a split or none"
        )
    if official:
        pool = [item for item in source_items if item.split == "train"]
        val_pool = [item for item in source_items if item.split == "val"]
        test = [item for item in source_items if item.split == "test"]
        if not val_pool:  # no official validation: carve it out of the training part
            pool, val_pool, _ = partition_groups(pool, data.VAL_FRACTION, 0.0, data.SPLIT_SEED)
    else:
        pool, val_pool, test = partition_groups(
            source_items, data.VAL_FRACTION, data.TEST_FRACTION, data.SPLIT_SEED
        )
    empty = [name for name in dataset.class_names if not any(i.class_name == name for i in pool)]
    if empty and (data.NUM_SHOTS > 0 or data.TRAIN_FRACTION > 0):
        raise SplitError(
            f"classes {', '.join(empty)} have no training images in source centers "
            f"{', '.join(sources)} (check the official split or DATASET.SOURCE_CENTERS)"
        )
    if data.TRAIN_FRACTION > 0:
        rounding = data.get("TRAIN_FRACTION_ROUNDING", "floor")
        train = sample_fraction(
            pool, data.TRAIN_FRACTION, data.SPLIT_SEED, data.SHOTS_PER, rounding
        )
    else:
        train = sample_few_shot(
            pool, data.NUM_SHOTS, data.SPLIT_SEED, data.SHOTS_PER, data.INSUFFICIENT_SHOTS
        )
    if data.VAL_SHOTS > 0:
        val = sample_few_shot(val_pool, data.VAL_SHOTS, data.SPLIT_SEED, "class", "take_all")
    else:
        val = sorted(val_pool, key=lambda item: (item.label, item.center, item.path))
    target_items = {c: [item for item in dataset.items if item.center == c] for c in targets}
    return train, val, sorted(test, key=lambda item: item.path), target_items


def compute_items_hash(items: Sequence[Item], root: Path, class_names: Sequence[str]) -> str:
    """sha1 of the class names and the sorted (relative path, label, center, group, split) lines."""
    lines = sorted(
        "\t".join(
            [_relative(item.path, root), str(item.label), item.center, item.group, item.split]
        )
        for item in items
    )
    return hashlib.sha1("\n".join(["\t".join(class_names), *lines]).encode()).hexdigest()


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def split_options(cfg: CfgNode) -> dict:
    """The config values besides shots and seed that change which images a split holds."""
    options = {
        key.lower(): list(cfg.DATASET[key])
        if isinstance(cfg.DATASET[key], (list, tuple))
        else cfg.DATASET[key]
        for key in OPTION_KEYS
    }
    if cfg.DATASET.get("TRAIN_FRACTION", 0):  # only when on: older split files stay valid
        options["train_fraction"] = cfg.DATASET.TRAIN_FRACTION
        options["train_fraction_rounding"] = cfg.DATASET.get("TRAIN_FRACTION_ROUNDING", "floor")
    return options


def split_file_path(dataset: DatasetBase, cfg: CfgNode) -> Path:
    """`<SPLIT_DIR or OUTPUT_DIR/splits>/<dataset>/shots_<k>_seed_<s>[_<options hash>].json`.

    The hash suffix appears when the options of `split_options` differ from the core defaults.
    """
    folder = Path(cfg.DATASET.SPLIT_DIR or Path(cfg.OUTPUT_DIR) / "splits").expanduser()
    folder = Path(os.path.abspath(folder)) / dataset.split_key
    if folder.resolve().is_relative_to(dataset.root.resolve()):
        raise SplitError(
            f"split folder {folder} is inside the data folder {dataset.root}; "
            "set DATASET.SPLIT_DIR or OUTPUT_DIR elsewhere"
        )
    name = f"shots_{cfg.DATASET.NUM_SHOTS}_seed_{cfg.DATASET.SPLIT_SEED}"
    options = split_options(cfg)
    if options != split_options(get_cfg_defaults()):
        name += "_" + hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return folder / f"{name}.json"


def _dump(value: object, indent: int = 0) -> str:
    """Deterministic JSON: sorted keys, one [path, label] entry per line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        body = ",\n".join(
            f"{inner}{json.dumps(k)}: {_dump(value[k], indent + 2)}" for k in sorted(value)
        )
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(value, list) and value and isinstance(value[0], list):
        body = ",\n".join(inner + json.dumps(entry) for entry in value)
        return "[\n" + body + "\n" + pad + "]"
    return json.dumps(value, sort_keys=True)


def write_split_file(
    path: Path,
    dataset: DatasetBase,
    cfg: CfgNode,
    train: list[Item],
    val: list[Item],
    test: list[Item],
    targets: dict[str, list[Item]],
) -> None:
    """Write the split atomically (temporary file + os.replace); same inputs, same bytes."""

    def entries(items: list[Item]) -> list[list]:
        return [[_relative(item.path, dataset.root), item.label] for item in items]

    content = {
        "format": SPLIT_FORMAT,
        "dataset": dataset.name,
        "class_names": list(dataset.class_names),
        "centers": list(dataset.centers),
        "items_hash": compute_items_hash(dataset.items, dataset.root, dataset.class_names),
        "num_shots": int(cfg.DATASET.NUM_SHOTS),
        "split_seed": int(cfg.DATASET.SPLIT_SEED),
        "options": split_options(cfg),
        "train": entries(train),
        "val": entries(val),
        "test": entries(test),
        "targets": {center: entries(items) for center, items in targets.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(_dump(content) + "\n")
    os.replace(temporary, path)


def load_split_file(path: Path, dataset: DatasetBase, cfg: CfgNode) -> Split:
    """Read a split file and check it still fits the dataset and the config."""
    raw = path.read_bytes()
    try:
        content = json.loads(raw)
    except ValueError as error:  # invalid JSON or not text at all
        raise SplitError(f"split file {path} is not valid JSON: {error}") from None
    check_split_content(path, content)
    if content.get("class_names") != list(dataset.class_names):
        raise SplitError(
            f"split file {path} was drawn for classes {content.get('class_names')}, "
            f"the dataset has {dataset.class_names}; delete the file to draw a new split"
        )
    if content.get("items_hash") != compute_items_hash(
        dataset.items, dataset.root, dataset.class_names
    ):
        raise SplitError(
            f"the dataset folder {dataset.root} changed since the split {path} was "
            "drawn; restore the data or delete the split file to draw a new one"
        )
    expected = {
        "num_shots": cfg.DATASET.NUM_SHOTS,
        "split_seed": cfg.DATASET.SPLIT_SEED,
        "options": split_options(cfg),
    }
    for key, value in expected.items():
        if content.get(key) != value:
            raise SplitError(
                f"split file {path} has {key} {content.get(key)!r}, config has {value!r}"
            )
    by_path = {_relative(item.path, dataset.root): item for item in dataset.items}

    def items_of(entries: list, part: str) -> list[Item]:
        found = []
        for relative, label in entries:
            item = by_path.get(relative)
            if item is None:
                state = (
                    "is not in the dataset"
                    if (dataset.root / relative).is_file()
                    else "does not exist"
                )
                raise SplitError(
                    f"split file {path} ({part}) references image {relative}, which {state}"
                )
            if item.label != label:
                raise SplitError(
                    f"split file {path} ({part}) gives {relative} label {label}, "
                    f"the dataset says {item.label} ({item.class_name})"
                )
            found.append(item)
        return found

    targets = {
        center: items_of(entries, f"target {center}")
        for center, entries in content["targets"].items()
    }
    parts = {part: items_of(content[part], part) for part in ("train", "val", "test")}
    check_split_parts(path, parts, targets)
    return Split(
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        targets=targets,
        path=path,
        sha1=hashlib.sha1(raw).hexdigest(),
    )


SPLIT_KEYS = ("class_names", "items_hash", "train", "val", "test", "targets")


def check_split_content(path: Path, content: Any) -> None:
    """The file's shape: an object with every key, each part a list of [path, label] pairs."""
    if not isinstance(content, dict):
        raise SplitError(f"split file {path} must hold a JSON object; delete it to draw again")
    missing = [key for key in SPLIT_KEYS if key not in content]
    if missing:
        raise SplitError(f"split file {path} has no key {missing[0]!r}; delete it to draw again")
    if not isinstance(content["targets"], dict):
        raise SplitError(f"split file {path}: 'targets' must map each center to a list")
    lists = {part: content[part] for part in ("train", "val", "test")}
    lists.update({f"target {c}": entries for c, entries in content["targets"].items()})
    for part, entries in lists.items():
        pairs = isinstance(entries, list) and all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in entries
        )
        if not pairs:
            raise SplitError(f"split file {path} ({part}) must be a list of [path, label] pairs")


def check_split_parts(path: Path, parts: dict[str, list[Item]], targets: dict) -> None:
    """Refuse an edited split: a duplicate entry, an image in two of train/val/test (a leak), or
    a group (patient, slide) in two of them, unless the dataset's official split put it there."""
    seen: dict[str, str] = {}
    for part, items in [*parts.items(), *((f"target {c}", i) for c, i in targets.items())]:
        local: set[str] = set()
        for item in items:
            if item.path in local:
                raise SplitError(f"split file {path} lists {item.path} twice in {part}")
            local.add(item.path)
            if not part.startswith("target") and item.path in seen:
                raise SplitError(
                    f"split file {path} puts {item.path} in both {seen[item.path]} and {part} "
                    "(a leak); delete the file to draw a new split"
                )
            seen.setdefault(item.path, part)
    group_part: dict[str, tuple[str, str]] = {}
    for part, items in parts.items():
        for item in items:
            if not item.group:
                continue
            other, official = group_part.setdefault(item.group, (part, item.split))
            # two official splits (say train and test) sharing a patient: the dataset's decision
            if other != part and not (item.split and official and item.split != official):
                raise SplitError(
                    f"split file {path} puts group {item.group!r} in both {other} and {part}; "
                    "delete the file to draw a new split"
                )


def build_split(dataset: DatasetBase, cfg: CfgNode) -> Split:
    """The run's split: read from its split file when it exists, else drawn, written and read."""
    path = split_file_path(dataset, cfg)
    if not path.is_file():
        write_split_file(path, dataset, cfg, *draw_split(dataset, cfg))
    return load_split_file(path, dataset, cfg)
