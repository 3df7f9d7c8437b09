"""Few-shot sampling, label-efficiency fractions, group-aware partitions and split files."""

from __future__ import annotations

import json
import random

import pytest
from conftest import write_image

from fewclip.data import Item
from fewclip.shots import compute_fraction_count, sample_fraction
from fewclip.splits import SplitError, build_split, partition_groups, sample_few_shot
from fewclip_datasets.csv_dataset import CSVDataset
from fewclip_datasets.image_folder import ImageFolder


def make_items(per_class: int, classes=("a", "b"), centers=("c1",), groups: int = 0) -> list[Item]:
    items = []
    for label, name in enumerate(classes):
        for center in centers:
            for index in range(per_class):
                group = f"{name}-g{index % groups}" if groups else ""
                items.append(
                    Item(f"/data/{center}/{name}/{index:03d}.png", label, name, center, group)
                )
    return items


def test_sampling_depends_only_on_items_shots_and_seed():
    items = make_items(10)
    shuffled = list(items)
    random.Random(5).shuffle(shuffled)
    first = sample_few_shot(items, 3, seed=1)
    assert first == sample_few_shot(shuffled, 3, seed=1)
    assert [item.label for item in first] == [0, 0, 0, 1, 1, 1]
    assert first != sample_few_shot(items, 3, seed=2)
    assert set(first) <= set(sample_few_shot(items, 5, seed=1))  # shot sets are nested


def test_sampling_per_class_and_center():
    items = make_items(4, centers=("c1", "c2", "c3"))
    chosen = sample_few_shot(items, 2, seed=0, per="class_center")
    counts = {(i.class_name, i.center): 0 for i in items}
    for item in chosen:
        counts[(item.class_name, item.center)] += 1
    assert set(counts.values()) == {2}
    assert len(sample_few_shot(items, 2, seed=0, per="class")) == 4


def test_insufficient_shots_error_names_the_class_and_take_all_keeps_all():
    items = make_items(5) + [Item("/data/c1/rare/0.png", 2, "rare", "c1")]
    with pytest.raises(SplitError, match="class 'rare' has 1 training images, fewer than 4"):
        sample_few_shot(items, 4, seed=0)
    chosen = sample_few_shot(items, 4, seed=0, insufficient="take_all")
    assert [item.class_name for item in chosen].count("rare") == 1 and len(chosen) == 9


def test_partition_is_disjoint_and_keeps_groups_whole():
    items = make_items(30, groups=10)
    train, val, test = partition_groups(items, 0.2, 0.3, seed=3)
    assert sorted(train + val + test, key=lambda i: i.path) == sorted(items, key=lambda i: i.path)
    group_parts = {}
    for part_name, part in (("train", train), ("val", val), ("test", test)):
        for item in part:
            group_parts.setdefault(item.group, set()).add(part_name)
    assert all(len(parts) == 1 for parts in group_parts.values())
    for label in (0, 1):  # stratified: 10 groups per class -> 3 test, 2 val, 5 train
        assert sum(i.label == label for i in test) == 9 and sum(i.label == label for i in val) == 6
    assert (train, val, test) == partition_groups(list(reversed(items)), 0.2, 0.3, seed=3)


def synthetic_like_tree(image_tree, per_class: int = 8):
    layout = {c: {"neg": per_class, "pos": per_class} for c in ("site1", "site2", "site3")}
    return image_tree(layout)


def test_split_file_is_byte_identical_for_same_inputs(image_tree, make_cfg, tmp_path):
    root = synthetic_like_tree(image_tree)
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=2, TARGET_CENTERS=["site3"])
    first = build_split(ImageFolder(cfg), cfg)
    cfg.OUTPUT_DIR = str(tmp_path / "other_output")
    second = build_split(ImageFolder(cfg), cfg)
    assert first.path != second.path and first.path.read_bytes() == second.path.read_bytes()
    assert first.sha1 == second.sha1 and first.train == second.train
    assert first.path.name.startswith("shots_2_seed_1_")  # suffix: TARGET_CENTERS is set
    assert first.path.is_relative_to(tmp_path / "output" / "splits")
    parts = [set(i.path for i in p) for p in (first.train, first.val, first.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert {i.center for i in first.train + first.val + first.test} == {"site1", "site2"}
    assert len(first.targets["site3"]) == 16 and len(first.train) == 4
    assert all(i.center == "site3" for i in first.targets["site3"])
    assert len(list(root.rglob("*.json"))) == 0  # nothing written into the data folder
    cfg.DATASET.SPLIT_SEED = 2
    other = build_split(ImageFolder(cfg), cfg)
    assert other.train != first.train and "seed_2" in other.path.name


def test_val_shots_cap_validation_per_class(image_tree, make_cfg):
    root = image_tree({"neg": 30, "pos": 30})
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=1, VAL_SHOTS=2)
    assert len(build_split(ImageFolder(cfg), cfg).val) == 4
    cfg.DATASET.VAL_SHOTS = 0
    split = build_split(ImageFolder(cfg), cfg)
    assert len(split.val) == 12 and len(split.test) == 18


def test_unknown_center_is_named_with_the_list(image_tree, make_cfg):
    root = synthetic_like_tree(image_tree, per_class=3)
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=1, TARGET_CENTERS=["site9"])
    with pytest.raises(SplitError, match="site9 .* its centers are site1, site2, site3"):
        build_split(ImageFolder(cfg), cfg)


def test_changed_dataset_is_detected(image_tree, make_cfg):
    root = image_tree({"neg": 10, "pos": 10})
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=2)
    split = build_split(ImageFolder(cfg), cfg)
    write_image(root / "pos" / "new.png", seed=99)
    with pytest.raises(SplitError, match=f"changed since the split {split.path}"):
        build_split(ImageFolder(cfg), cfg)


def test_hand_edited_split_with_missing_image_is_named(image_tree, make_cfg):
    root = image_tree({"neg": 10, "pos": 10})
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=2)
    split = build_split(ImageFolder(cfg), cfg)
    content = json.loads(split.path.read_text())
    content["train"][0][0] = "neg/lost.png"
    split.path.write_text(json.dumps(content))
    with pytest.raises(SplitError, match="references image neg/lost.png, which does not exist"):
        build_split(ImageFolder(cfg), cfg)
    content["class_names"] = ["pos", "neg"]
    split.path.write_text(json.dumps(content))
    with pytest.raises(SplitError, match=r"drawn for classes \['pos', 'neg'\]"):
        build_split(ImageFolder(cfg), cfg)


def test_official_split_from_csv_is_used(tmp_path, make_cfg):
    rows = ["path,label,split,group"]
    for index in range(12):
        split = "train" if index < 8 else "test"
        for name in ("neg", "pos"):
            write_image(tmp_path / "data" / "img" / f"{name}{index}.png", seed=index)
            rows.append(f"img/{name}{index}.png,{name},{split},p{index // 2}")
    (tmp_path / "data" / "table.csv").write_text("\n".join(rows) + "\n")
    cfg = make_cfg("CSVDataset", NUM_SHOTS=2, VAL_FRACTION=0.25)
    cfg.DATASET.CSV.FILE = str(tmp_path / "data" / "table.csv")
    split = build_split(CSVDataset(cfg), cfg)
    assert {i.split for i in split.test} == {"test"} and len(split.test) == 8
    assert {i.split for i in split.train + split.val} == {"train"} and len(split.train) == 4
    train_groups = {i.group for i in split.train}
    assert not train_groups & {i.group for i in split.val}
    cfg.OUTPUT_DIR = str(tmp_path / "data" / "output")
    with pytest.raises(SplitError, match="inside the data folder"):
        build_split(CSVDataset(cfg), cfg)


def test_class_without_training_images_is_named(tmp_path, make_cfg):
    rows = ["path,label,split"]
    for index, (name, split) in enumerate([("neg", "train"), ("neg", "test"), ("pos", "test")]):
        write_image(tmp_path / "data" / f"{index}.png", seed=index)
        rows.append(f"{index}.png,{name},{split}")
    (tmp_path / "data" / "table.csv").write_text("\n".join(rows) + "\n")
    cfg = make_cfg("CSVDataset", NUM_SHOTS=1, INSUFFICIENT_SHOTS="take_all")
    cfg.DATASET.CSV.FILE = str(tmp_path / "data" / "table.csv")
    with pytest.raises(SplitError, match="classes pos have no training images"):
        build_split(CSVDataset(cfg), cfg)


# ----- label efficiency: CervixFM takes int(f * n) per class (instance_dataset.py:32) -----------
@pytest.mark.parametrize(
    ("fraction", "count", "floor", "ceil"),
    [(0.3, 7, 2, 3), (0.29, 100, 28, 29), (0.5, 9, 4, 5), (0.1, 5, 0, 1), (0.25, 8, 2, 2)],
)
def test_fraction_count_is_int_of_f_times_n_or_ceil(fraction, count, floor, ceil):
    assert compute_fraction_count(fraction, count, "floor") == int(fraction * count) == floor
    assert compute_fraction_count(fraction, count, "ceil") == ceil


def test_sample_fraction_floor_and_ceil_per_class_and_nested():
    items = make_items(7, classes=("a", "b", "c"))
    floor = sample_fraction(items, 0.3, seed=4, rounding="floor")
    ceil = sample_fraction(items, 0.3, seed=4, rounding="ceil")
    for chosen, expected in ((floor, int(0.3 * 7)), (ceil, 3)):
        assert {name: sum(i.class_name == name for i in chosen) for name in "abc"} == dict.fromkeys(
            "abc", expected
        )
    assert set(floor) < set(ceil)  # one per-class shuffle: the smaller share is a subset
    assert set(sample_few_shot(items, 1, seed=4)) <= set(floor)


def test_fraction_rounding_to_zero_names_the_class_and_bad_rounding_the_choices():
    items = make_items(9, classes=("big",)) + make_items(3, classes=("small",))
    with pytest.raises(SplitError, match="class 'small'.*rounds down to 0.*ROUNDING ceil"):
        sample_fraction(items, 0.2, seed=1, rounding="floor")
    assert len(sample_fraction(items, 0.2, seed=1, rounding="ceil")) == 2 + 1
    with pytest.raises(SplitError, match="TRAIN_FRACTION_ROUNDING 'round'.*floor, ceil"):
        sample_fraction(items, 0.2, seed=1, rounding="round")


def test_fraction_rounding_is_part_of_the_split_file(image_tree, make_cfg):
    root = image_tree({"a": 7, "b": 7})
    names = {}
    for rounding, expected in (("floor", 2), ("ceil", 3)):  # 0.5 of the 5 left after the test 2
        cfg = make_cfg("ImageFolder", ROOT=str(root), TRAIN_FRACTION=0.5, VAL_FRACTION=0.0)
        cfg.DATASET.TEST_FRACTION = 0.3
        cfg.DATASET.TRAIN_FRACTION_ROUNDING = rounding
        split = build_split(ImageFolder(cfg), cfg)
        names[rounding] = split.path.name
        assert sum(item.class_name == "a" for item in split.test) == 2
        assert sum(item.class_name == "a" for item in split.train) == expected
        assert json.loads(split.path.read_text())["options"]["train_fraction_rounding"] == rounding
    assert names["floor"] != names["ceil"]


def _move_to_test(content: dict) -> None:
    """Move the first train image into test, keeping the rest of its group in train."""
    content["test"].append(content["train"].pop(0))


EDITS = {
    "a test image copied into train": (
        lambda c: c["train"].append(c["test"][0]),
        "in both train and test",
    ),
    "a duplicate train entry": (lambda c: c["train"].append(c["train"][0]), "twice in train"),
    "a missing key": (lambda c: c.pop("targets"), "has no key 'targets'"),
    "a group in train and test": (_move_to_test, "puts group 'p"),
    "not a list of pairs": (lambda c: c.update(val=[["x"]]), r"\(val\) must be a list"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_edited_split_files_are_refused_in_one_line(tmp_path, make_cfg, edit):
    rows = ["path,label,group"]
    for index in range(12):
        for name in ("neg", "pos"):
            write_image(tmp_path / "data" / "img" / f"{name}{index}.png", seed=index)
            rows.append(f"img/{name}{index}.png,{name},p{index // 2}")
    (tmp_path / "data" / "table.csv").write_text("\n".join(rows) + "\n")
    cfg = make_cfg("CSVDataset", NUM_SHOTS=2)
    cfg.DATASET.CSV.FILE = str(tmp_path / "data" / "table.csv")
    split = build_split(CSVDataset(cfg), cfg)
    change, message = EDITS[edit]
    content = json.loads(split.path.read_text())
    change(content)
    split.path.write_text(json.dumps(content))
    with pytest.raises(SplitError, match=message) as error:
        build_split(CSVDataset(cfg), cfg)
    assert str(split.path) in str(error.value) and "\n" not in str(error.value)


def test_a_split_file_that_is_not_json_is_one_line(image_tree, make_cfg):
    root = image_tree({"neg": 10, "pos": 10})
    cfg = make_cfg("ImageFolder", ROOT=str(root), NUM_SHOTS=2)
    split = build_split(ImageFolder(cfg), cfg)
    for content in (b"\x80\x04\x95 pickled", b"[1, 2]"):
        split.path.write_bytes(content)
        with pytest.raises(SplitError, match=str(split.path)):
            build_split(ImageFolder(cfg), cfg)
