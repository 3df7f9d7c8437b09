"""Datasets, image loading and prompts on generated inputs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from fewclip.data import DatasetError, ImageError, load_image
from fewclip.prompts import PromptError, build_default_prompts, load_prompt_file
from fewclip_datasets.csv_dataset import CSVDataset
from fewclip_datasets.image_folder import ImageFolder
from fewclip_datasets.synthetic import SyntheticMultiCenter


def small_synthetic(make_cfg, cache_dir):
    cfg = make_cfg("SyntheticMultiCenter")
    cfg.CACHE_DIR = str(cache_dir)
    cfg.DATASET.SYNTHETIC.IMAGES_PER_CLASS = 3
    cfg.DATASET.SYNTHETIC.IMAGE_SIZE = 32
    return cfg


def test_synthetic_is_deterministic_with_expected_counts(make_cfg, tmp_path):
    first = SyntheticMultiCenter(small_synthetic(make_cfg, tmp_path / "one"))
    second = SyntheticMultiCenter(small_synthetic(make_cfg, tmp_path / "two"))
    assert first.class_names == ["normal", "lsil", "hsil", "carcinoma"]
    assert first.centers == ["center_a", "center_b", "center_c"]
    counts = first.count_table()
    assert all(counts[c][k] == 3 for c in first.centers for k in first.class_names)
    assert len(first.items) == 36
    relative = [p.relative_to(first.root) for p in sorted(first.root.rglob("*.png"))]
    assert relative == [p.relative_to(second.root) for p in sorted(second.root.rglob("*.png"))]
    assert all((first.root / r).read_bytes() == (second.root / r).read_bytes() for r in relative)
    assert first.positive_classes == ["hsil", "carcinoma"]
    assert "squamous cell carcinoma" in first.prompts.texts("label")[3][0]
    assert "center_b" in first.describe() and "36 images" in first.describe()
    image = load_image(first.items[0].path)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_synthetic_reuses_its_cache_and_leaves_no_temporary_folders(make_cfg, tmp_path):
    cfg = small_synthetic(make_cfg, tmp_path / "cache")
    root = SyntheticMultiCenter(cfg).root
    stamp = (root / "center_a" / "normal").stat().st_mtime_ns
    assert SyntheticMultiCenter(cfg).root == root
    assert (root / "center_a" / "normal").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == [root.name]
    cfg.DATASET.SYNTHETIC.IMAGES_PER_CLASS = 2  # other parameters: another folder
    assert SyntheticMultiCenter(cfg).root != root


def test_image_folder_flat_layout(image_tree, make_cfg):
    root = image_tree({"benign": 2, "malignant": 3})
    (root / "benign" / "notes.txt").write_text("not an image")
    dataset = ImageFolder(make_cfg("ImageFolder", ROOT=str(root)))
    assert dataset.class_names == ["benign", "malignant"]
    assert dataset.centers == ["default"]
    assert [item.label for item in dataset.items] == [0, 0, 1, 1, 1]
    assert dataset.prompts.texts("label")[1][0] == "a photo of malignant."
    ordered = ImageFolder(
        make_cfg("ImageFolder", ROOT=str(root), CLASS_NAMES=["malignant", "benign"])
    )
    assert ordered.class_names == ["malignant", "benign"]
    assert {item.class_name: item.label for item in ordered.items} == {"malignant": 0, "benign": 1}


def test_image_folder_center_layout(image_tree, make_cfg):
    root = image_tree({"site1": {"a": 2, "b": 2}, "site2": {"a": 1, "b": 3}})
    dataset = ImageFolder(make_cfg("ImageFolder", ROOT=str(root)))
    assert dataset.centers == ["site1", "site2"] and dataset.class_names == ["a", "b"]
    assert dataset.count_table()["site2"]["b"] == 3
    only = ImageFolder(make_cfg("ImageFolder", ROOT=str(root), CENTERS=["site2"]))
    assert only.centers == ["site2"] and len(only.items) == 4
    with pytest.raises(DatasetError, match="site3"):
        ImageFolder(make_cfg("ImageFolder", ROOT=str(root), CENTERS=["site3"]))


def test_missing_root_names_the_path(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(make_cfg("ImageFolder", ROOT=str(tmp_path / "nowhere")))


def test_empty_class_folder_names_class_and_folder(image_tree, make_cfg):
    root = image_tree({"a": 2})
    (root / "b").mkdir()
    with pytest.raises(DatasetError, match=r"'b' folder .*data/b has no images"):
        ImageFolder(make_cfg("ImageFolder", ROOT=str(root)))


def test_class_missing_in_one_center_names_class_and_centers(image_tree, make_cfg):
    root = image_tree({"site1": {"a": 2, "b": 2}, "site2": {"a": 2}})
    with pytest.raises(
        DatasetError, match=r"class 'b' has images in centers site1 but none in site2"
    ):
        ImageFolder(make_cfg("ImageFolder", ROOT=str(root)))


def test_unknown_positive_class_is_named(image_tree, make_cfg):
    root = image_tree({"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="'c'|c;"):
        ImageFolder(make_cfg("ImageFolder", ROOT=str(root), POSITIVE_CLASSES=["c"]))


def test_csv_dataset_reads_columns(tmp_path, make_cfg):
    for name in ("x1.png", "x2.png", "x3.png", "x4.png"):
        write_image(tmp_path / "images" / name)
    table = tmp_path / "table.csv"
    table.write_text(
        "path,label,center,group,split\n"
        "images/x1.png,tumor,h1,p1,train\nimages/x2.png,normal,h1,p1,valid\n"
        "images/x3.png,tumor,,p2,test\nimages/x4.png,0,,p3,Train\n"
    )
    cfg = make_cfg("CSVDataset")
    cfg.DATASET.CSV.FILE = str(table)
    cfg.DATASET.CLASS_NAMES = ["normal", "tumor"]  # label ids allowed when names are given
    dataset = CSVDataset(cfg)
    assert dataset.root == tmp_path and dataset.class_names == ["normal", "tumor"]
    by_name = {item.path.rsplit("/", 1)[1]: item for item in dataset.items}
    assert by_name["x2.png"].split == "val" and by_name["x2.png"].label == 0
    assert by_name["x3.png"].center == "default" and by_name["x1.png"].group == "p1"
    assert by_name["x4.png"].class_name == "normal" and by_name["x4.png"].split == "train"
    table.write_text("path,label\nimages/x1.png,tumor\nimages/gone.png,normal\n")
    with pytest.raises(DatasetError, match="gone.png"):
        CSVDataset(cfg)
    table.write_text("path,label\nimages/x1.png,tumor\n")
    cfg.DATASET.CLASS_NAMES = ["normal"]
    with pytest.raises(DatasetError, match="line 2: label 'tumor'"):
        CSVDataset(cfg)


def test_unreadable_images_raise_image_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = write_image(tmp_path / "good.png", size=64)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-200])
    for path in (empty, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageError, match=path.name):
            load_image(path)


def test_image_modes_convert_to_8bit_rgb(tmp_path):
    grey = np.full((4, 4), 100, np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3], rgba[2:, :, 3] = 200, 255, 0  # bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, "L").convert("P").save(tmp_path / "palette.png")
    twelve_bit = np.full((4, 4), 4095, np.uint16)
    twelve_bit[0, 0] = 0
    Image.fromarray(twelve_bit).save(tmp_path / "deep.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "full.tif")
    expected = {
        "grey.png": (100, 100, 100),
        "palette.png": (100, 100, 100),
        "deep.png": (255, 255, 255),
        "full.tif": (255, 255, 255),
    }
    for name, pixel in expected.items():
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.getpixel((3, 3)) == pixel, name
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (0, 0, 0)
    converted = load_image(tmp_path / "rgba.png")
    assert converted.getpixel((0, 0)) == (200, 0, 0) and converted.getpixel((0, 3)) == (
        255,
        255,
        255,
    )


def test_prompt_file_levels_and_missing_class(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "templates: ['an image of {}.', 'a slide of {}.']\n"
        "classes:\n  a: {label: alpha, short: s-a, description: d-a}\n  b: {label: beta}\n"
        "  extra: {label: unused}\n"
    )
    prompts = load_prompt_file(path, ["b", "a"])
    assert list(prompts.classes) == ["b", "a"]
    assert prompts.texts("label") == [
        ["an image of beta.", "a slide of beta."],
        ["an image of alpha.", "a slide of alpha."],
    ]
    with pytest.raises(PromptError, match=r"'short' missing for classes b in .*prompts.yaml"):
        prompts.texts("short")
    with pytest.raises(PromptError, match="unknown prompt level"):
        prompts.texts("long")
    with pytest.raises(PromptError, match=r"prompts.yaml has no entry for classes c"):
        load_prompt_file(path, ["a", "c"])
    defaults = build_default_prompts(["high_grade"])
    assert defaults.texts("short") == [["a photo of high grade."]]


@pytest.mark.parametrize("value", ["../outside.png", "/etc/passwd", "img/../../outside.png"])
def test_csv_paths_that_leave_root_are_refused_unless_declared_absolute(tmp_path, make_cfg, value):
    root = tmp_path / "data"
    write_image(root / "img" / "a0.png", seed=0)
    write_image(tmp_path / "outside.png", seed=1)
    table = root / "table.csv"
    table.write_text(f"path,label\nimg/a0.png,a\n{value},b\n")
    cfg = make_cfg("CSVDataset")
    cfg.DATASET.CSV.FILE = str(table)
    with pytest.raises(DatasetError, match="leaves the data folder") as error:
        CSVDataset(cfg).load_items()
    assert "line 3" in str(error.value) and "ABSOLUTE_PATHS" in str(error.value)
    if value != "/etc/passwd":  # declared: the outside image is read
        cfg.DATASET.CSV.ABSOLUTE_PATHS = True
        _, items = CSVDataset(cfg).load_items()
        assert items[1].path == str(tmp_path / "outside.png")
