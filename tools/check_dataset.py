"""Check a data folder before training: counts, unreadable files, class names, duplicates.

    python tools/check_dataset.py configs/datasets/herlev.yaml DATASET.ROOT /data/herlev
    python tools/check_dataset.py --folder /data/my_images      # <class>/ or <center>/<class>/

Prints images per class and center, then one line per problem naming the file or class:
UNREADABLE (cannot be decoded; runs fail on it, or skip it with DATASET.SKIP_UNREADABLE True),
EMPTY (a class folder without images), MISMATCH (a class folder in some centers but not in
others), DUPLICATE (the same bytes under two classes), DATASET (the dataset refuses the folder).
Exit code 1 when any problem is found, 0 otherwise. Same-class duplicates are listed as notes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter, defaultdict
from pathlib import Path

from fewclip.config import build_config, split_opts
from fewclip.data import (
    DEFAULT_CENTER,
    DatasetError,
    ImageError,
    Item,
    list_images,
    list_subfolders,
    load_image,
)
from fewclip.registry import DATASETS, load_installed_plugins


def scan_folder(root: Path) -> tuple[list[Item], list[str]]:
    """Items of `root/<class>/*` or `root/<center>/<class>/*`, and the layout problems found.

    Centered when no folder of root holds images directly and every folder holds subfolders.
    """
    folders = list_subfolders(root)
    centered = bool(folders) and all(
        not list_images(folder) and list_subfolders(folder) for folder in folders
    )
    centers = {f.name: f for f in folders} if centered else {DEFAULT_CENTER: root}
    problems, items = [], []
    classes_by_center = {c: [p.name for p in list_subfolders(b)] for c, b in centers.items()}
    class_names = sorted({name for names in classes_by_center.values() for name in names})
    for name in class_names:
        absent = [c for c, names in classes_by_center.items() if name not in names]
        if absent:
            present = [c for c in centers if c not in absent]
            problems.append(
                f"MISMATCH class {name!r} has a folder in centers {', '.join(present)} "
                f"but not in {', '.join(absent)}"
            )
    for center, base in centers.items():
        for folder in list_subfolders(base):
            files = list_images(folder)
            if not files:
                problems.append(f"EMPTY {folder}: class folder {folder.name!r} has no images")
            label = class_names.index(folder.name)
            items.extend(Item(str(file), label, folder.name, center) for file in files)
    return items, problems


def make_count_table(items: list[Item]) -> str:
    """Images per class (rows) and center (columns)."""
    counts = Counter((item.class_name, item.center) for item in items)
    classes = sorted({item.class_name for item in items})
    centers = sorted({item.center for item in items})
    width = max([len("class"), *(len(name) for name in classes)])
    widths = [max(len(center), 6) for center in [*centers, "total"]]
    lines = [
        "  ".join(
            [f"{'class':<{width}}", *(f"{c:>{w}}" for c, w in zip([*centers, "total"], widths))]
        )
    ]
    for name in classes:
        values = [counts[(name, center)] for center in centers]
        cells = [f"{v:>{w}}" for v, w in zip([*values, sum(values)], widths)]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def check_items(items: list[Item], decode: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes): unreadable files and duplicates across classes; same-class duplicates
    are notes (they inflate counts and may leak between train and test)."""
    problems, notes = [], []
    by_hash: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        try:
            by_hash[hashlib.sha1(Path(item.path).read_bytes()).hexdigest()].append(item)
            if decode:
                load_image(item.path)
        except (OSError, ImageError) as error:
            reason = str(error).split(": ", 1)[-1] if isinstance(error, ImageError) else error
            problems.append(f"UNREADABLE {item.path}: {reason}")
    for copies in by_hash.values():
        first = copies[0]
        for other in copies[1:]:
            line = f"{other.path} ({other.class_name}) has the same content as {first.path}"
            if other.class_name != first.class_name:
                problems.append(f"DUPLICATE {line} ({first.class_name})")
            else:
                notes.append(f"note: duplicate {line}")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_config", nargs="?", help="dataset YAML (configs/datasets/...)")
    parser.add_argument("--folder", help="check a raw <class>/ or <center>/<class>/ folder")
    parser.add_argument("--skip-decode", action="store_true", help="hash files, do not decode")
    flags, opts = split_opts(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(flags)
    load_installed_plugins()
    args.opts = opts
    if bool(args.folder) == bool(args.dataset_config):
        parser.error("give a dataset YAML or --folder, not both")
    problems: list[str] = []
    if args.folder:
        root = Path(args.folder)
        if not root.is_dir():
            print(f"DATASET folder {root} does not exist")
            return 1
        items, problems = scan_folder(root)
    else:
        cfg = build_config(None, args.dataset_config, list(args.opts))
        try:
            items = DATASETS.get(cfg.DATASET.NAME)(cfg).items
        except (DatasetError, FileNotFoundError) as error:
            print(f"DATASET {error}")
            return 1
    print(make_count_table(items) if items else "no images found")
    found, notes = check_items(items, decode=not args.skip_decode)
    problems += found
    for line in [*notes, *problems]:
        print(line)
    print(f"{len(items)} images, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
