"""Make split files for a dataset and print what they hold, or inspect an existing split file.

    python tools/make_split.py configs/datasets/herlev.yaml DATASET.ROOT /data/herlev \\
        --shots 1 4 16 --seeds 1 2 3 [--output-dir output] [KEY VALUE ...]
    python tools/make_split.py configs/datasets/herlev.yaml DATASET.ROOT /data/herlev \\
        --inspect output/splits/Herlev_herlev_1a2b3c4d/shots_4_seed_1.json

Split files go where runs look for them (DATASET.SPLIT_DIR, else <OUTPUT_DIR>/splits), so a sweep
run afterwards reads these exact files. Counts are printed per class and center for train, val,
test and every target center.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from fewclip.config import build_config, split_opts
from fewclip.data import DatasetBase, Item
from fewclip.registry import DATASETS, load_installed_plugins
from fewclip.splits import build_split


def make_split_table(dataset: DatasetBase, parts: dict[str, list[Item]]) -> str:
    """Text table: one row per (class, center) present, one column per part, plus totals."""
    counts = {
        name: Counter((i.class_name, i.center) for i in items) for name, items in parts.items()
    }
    rows = sorted(
        {key for counter in counts.values() for key in counter},
        key=lambda key: (dataset.class_names.index(key[0]), key[1]),
    )
    width_class = max([len("class"), *(len(c) for c, _ in rows)])
    width_center = max([len("center"), *(len(c) for _, c in rows)])
    widths = [max(len(name), 5) for name in parts]
    header = [f"{'class':<{width_class}}", f"{'center':<{width_center}}"]
    lines = ["  ".join(header + [f"{n:>{w}}" for n, w in zip(parts, widths)])]
    for class_name, center in rows:
        cells = [f"{counts[n][(class_name, center)]:>{w}}" for n, w in zip(parts, widths)]
        lines.append(
            "  ".join([f"{class_name:<{width_class}}", f"{center:<{width_center}}", *cells])
        )
    totals = [f"{len(parts[n]):>{w}}" for n, w in zip(parts, widths)]
    lines.append("  ".join([f"{'total':<{width_class}}", " " * width_center, *totals]))
    return "\n".join(lines)


def load_split_parts(path: Path, dataset: DatasetBase) -> dict[str, list[Item]]:
    """The parts of a split file as dataset items (an entry not in the dataset is an error)."""
    content = json.loads(path.read_text())
    by_path = {Path(os.path.relpath(i.path, dataset.root)).as_posix(): i for i in dataset.items}
    parts = {"train": content["train"], "val": content["val"], "test": content["test"]}
    parts |= {f"target:{c}": entries for c, entries in content["targets"].items()}
    found: dict[str, list[Item]] = {}
    for name, entries in parts.items():
        missing = [relative for relative, _ in entries if relative not in by_path]
        if missing:
            raise SystemExit(
                f"split file {path} ({name}) references {missing[0]}, not in the dataset"
            )
        found[name] = [by_path[relative] for relative, _ in entries]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_config", help="dataset YAML (configs/datasets/...)")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="shot counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="split seeds")
    parser.add_argument("--output-dir", default=None, help="OUTPUT_DIR (splits go to <it>/splits)")
    parser.add_argument("--inspect", default=None, help="print the counts of this split file")
    flags, opts = split_opts(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(flags)
    load_installed_plugins()
    args.opts = opts
    opts = list(args.opts) + (["OUTPUT_DIR", args.output_dir] if args.output_dir else [])
    base = build_config(None, args.dataset_config, opts)
    dataset = DATASETS.get(base.DATASET.NAME)(base)
    print(dataset.describe())
    if args.inspect:
        path = Path(args.inspect)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        print(f"\nsplit file {path} (sha1 {digest[:12]})")
        print(make_split_table(dataset, load_split_parts(path, dataset)))
        return 0
    for shots in args.shots or [base.DATASET.NUM_SHOTS]:
        for seed in args.seeds or [base.DATASET.SPLIT_SEED]:
            extra = ["DATASET.NUM_SHOTS", str(shots), "DATASET.SPLIT_SEED", str(seed)]
            cfg = build_config(None, args.dataset_config, opts + extra)
            split = build_split(dataset, cfg)
            parts = {"train": split.train, "val": split.val, "test": split.test}
            parts |= {f"target:{c}": items for c, items in split.targets.items()}
            print(f"\nshots {shots}, split seed {seed}: {split.path} (sha1 {split.sha1[:12]})")
            print(make_split_table(dataset, parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
