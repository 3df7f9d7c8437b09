"""Which training images a run gets: k shots per class, or a share of each class (label
efficiency). Both take the first items of one seeded per-class shuffle, so smaller shot sets and
smaller fractions are subsets of larger ones."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

from fewclip.data import DatasetError, Item


class SplitError(DatasetError):
    """A split that cannot be drawn or a split file that no longer fits the dataset."""


def _shuffled(items: Sequence[Item], seed: int, key: str) -> list[Item]:
    """Items sorted by path, then shuffled by a generator seeded from (seed, key) only.

    A string seed is hashed with SHA-512 by `random.Random`, independent of PYTHONHASHSEED.
    """
    ordered = sorted(items, key=lambda item: item.path)
    random.Random(f"{seed}:{key}").shuffle(ordered)
    return ordered


def sample_few_shot(
    items: Sequence[Item],
    num_shots: int,
    seed: int,
    per: str = "class",
    insufficient: str = "error",
) -> list[Item]:
    """`num_shots` items per class (per="class") or per class and center (per="class_center").

    The result depends on (items, num_shots, seed) only, not on the input order. A class with
    fewer items than `num_shots` raises `SplitError` naming it (insufficient="error") or gives
    all its items (insufficient="take_all"). Returned sorted by (label, center, path).
    """
    if per not in ("class", "class_center"):
        raise SplitError(f"DATASET.SHOTS_PER must be 'class' or 'class_center', not {per!r}")
    if insufficient not in ("error", "take_all"):
        raise SplitError(
            f"DATASET.INSUFFICIENT_SHOTS must be 'error' or 'take_all', not {insufficient!r}"
        )
    if num_shots < 0:
        raise SplitError(f"number of shots must be >= 0, got {num_shots}")
    strata: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        strata[(item.class_name, item.center if per == "class_center" else "")].append(item)
    short = [
        (f"{class_name!r}" + (f" in center {center!r}" if center else ""), len(members))
        for (class_name, center), members in sorted(strata.items())
        if len(members) < num_shots
    ]
    if short and insufficient == "error":  # every short class at once, with its image count
        fix = "(lower DATASET.NUM_SHOTS or set DATASET.INSUFFICIENT_SHOTS take_all)"
        if len(short) == 1:
            name, count = short[0]
            raise SplitError(
                f"class {name} has {count} training images, fewer than {num_shots} shots {fix}"
            )
        listed = ", ".join(f"{name} ({count} training images)" for name, count in short)
        raise SplitError(f"classes {listed} have fewer than {num_shots} shots {fix}")
    chosen: list[Item] = []
    for (class_name, center), members in sorted(strata.items()):
        chosen.extend(_shuffled(members, seed, f"{class_name}/{center}")[:num_shots])
    return sorted(chosen, key=lambda item: (item.label, item.center, item.path))


FRACTION_ROUNDINGS = ("floor", "ceil")  # DATASET.TRAIN_FRACTION_ROUNDING


def compute_fraction_count(fraction: float, count: int, rounding: str) -> int:
    """Images kept of a class of `count`: int(f * n) ("floor", CervixFM instance_dataset.py:32)
    or ceil(f * n) ("ceil": never 0 for a non-empty class)."""
    if rounding not in FRACTION_ROUNDINGS:
        raise SplitError(
            f"DATASET.TRAIN_FRACTION_ROUNDING {rounding!r} is not one of "
            f"{', '.join(FRACTION_ROUNDINGS)}"
        )
    return int(fraction * count) if rounding == "floor" else math.ceil(fraction * count)


def sample_fraction(
    items: Sequence[Item],
    fraction: float,
    seed: int,
    per: str = "class",
    rounding: str = "floor",
) -> list[Item]:
    """Label efficiency: int(fraction x n) (or ceil) items of each class (or class and center).

    Uses the same per-class shuffle as `sample_few_shot`, so smaller fractions (and shot sets)
    are subsets of larger ones. A class left with 0 images is an error naming it (CervixFM would
    drop it silently). Returned sorted by (label, center, path).
    """
    if not 0 < fraction <= 1:
        raise SplitError(f"DATASET.TRAIN_FRACTION must be in (0, 1], not {fraction}")
    compute_fraction_count(fraction, 1, rounding)  # checks the choice before any class
    strata: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        strata[(item.class_name, item.center if per == "class_center" else "")].append(item)
    chosen: list[Item] = []
    for (class_name, center), members in sorted(strata.items()):
        count = compute_fraction_count(fraction, len(members), rounding)
        if count == 0:
            where = f" in center {center!r}" if center else ""
            raise SplitError(
                f"class {class_name!r}{where}: DATASET.TRAIN_FRACTION {fraction} of its "
                f"{len(members)} training images rounds down to 0 (raise the fraction or set "
                "DATASET.TRAIN_FRACTION_ROUNDING ceil)"
            )
        chosen.extend(_shuffled(members, seed, f"{class_name}/{center}")[:count])
    return sorted(chosen, key=lambda item: (item.label, item.center, item.path))
