"""Cross-center protocol: leave-one-center-out folds, source/target splits, label maps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image, write_oct_tree

from fewclip.config import build_config
from fewclip.data import DatasetError
from fewclip.label_map import (
    LabelMapError,
    build_label_map,
    compute_mapped_probabilities,
    evaluate_with_label_map,
    load_label_map,
)
from fewclip.protocol import expand_leave_one_center_out, load_dataset_centers
from fewclip.run import execute_run
from fewclip.splits import build_split
from fewclip_datasets.cervical_oct import CervicalOCT
from fewclip_datasets.herlev import CLASS_NAMES as HERLEV_CLASSES


def test_leave_one_center_out_folds():
    folds = expand_leave_one_center_out(["a", "b, two", "c"], recipe_name="clip_lora")
    assert len(folds) == 3
    assert folds[1] == [
        "DATASET.SOURCE_CENTERS",
        "['a', 'c']",
        "DATASET.TARGET_CENTERS",
        "['b, two']",
        "RECIPE",
        "clip_lora-loco_b, two",
    ]
    assert expand_leave_one_center_out(["x", "y"])[0] == [
        "DATASET.SOURCE_CENTERS",
        "['y']",
        "DATASET.TARGET_CENTERS",
        "['x']",
    ]
    with pytest.raises(DatasetError, match="at least 2 centers"):
        expand_leave_one_center_out(["only"])
    with pytest.raises(DatasetError, match="centers repeated: a"):
        expand_leave_one_center_out(["a", "b", "a"])


def test_leave_one_center_out_opts_drive_the_split(tmp_path):
    root = write_oct_tree(tmp_path / "oct", per_class=4)
    base = ["DATASET.ROOT", str(root), "OUTPUT_DIR", str(tmp_path / "out")]
    centers = load_dataset_centers("configs/datasets/cervical_oct.yaml", base)
    assert centers == ["huaxi", "mixed", "xiangya"]
    for held_out, fold in zip(centers, expand_leave_one_center_out(centers)):
        opts = base + fold + ["DATASET.NUM_SHOTS", "1", "DATASET.SHOTS_PER", "class_center"]
        cfg = build_config(None, "configs/datasets/cervical_oct.yaml", opts)
        assert list(cfg.DATASET.TARGET_CENTERS) == [held_out]
        split = build_split(CervicalOCT(cfg), cfg)
        assert list(split.targets) == [held_out] and len(split.targets[held_out]) == 20
        used = {item.center for item in split.train + split.val + split.test}
        assert held_out not in used and len(used) == 2
        assert len(split.train) == 5 * 2  # one shot per class and source center


def test_cross_magnification_run_reports_each_target_center(tmp_path):
    root = tmp_path / "oral"
    counter = 0
    for magnification in ("100x", "400x"):
        for name in ("Normal", "OSCC"):
            for index in range(6):
                counter += 1
                write_image(
                    root / f"oral_histopath_{magnification}" / name / f"{index}.png", counter
                )
    opts = ["DATASET.ROOT", str(root), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += [
        "CACHE_DIR",
        str(tmp_path / "cache"),
        "DATASET.NUM_SHOTS",
        "2",
        "DATASET.VAL_SHOTS",
        "1",
    ]
    cfg = build_config("configs/trainers/zeroshot.yaml", "configs/datasets/oral_scc.yaml", opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    assert list(results["metrics"]["targets"]) == ["400x"]
    assert results["metrics"]["targets"]["400x"]["num_samples"] == 12
    assert "binary" in results["metrics"]["targets"]["400x"]
    assert results["metrics"]["targets_summary"]["accuracy"]["worst_center"] == "400x"


# --- label maps -------------------------------------------------------------------------


def test_label_map_file_for_herlev_to_bethesda_loads():
    label_map = load_label_map(
        "configs/label_maps/herlev7_to_bethesda3.yaml", HERLEV_CLASSES, ["normal", "lsil", "hsil"]
    )
    assert label_map.matrix().sum(axis=0).tolist() == [3.0, 1.0, 3.0]
    assert label_map.mapping["carcinoma_in_situ"] == "hsil"


def test_label_map_errors_name_the_classes(tmp_path):
    source, target = ["a", "b", "c"], ["x", "y"]
    with pytest.raises(LabelMapError, match="no target for source classes c"):
        build_label_map({"a": "x", "b": "y"}, source, target)
    with pytest.raises(LabelMapError, match="maps to z, which are not target classes"):
        build_label_map({"a": "x", "b": "y", "c": "z"}, source, target)
    with pytest.raises(LabelMapError, match="maps no source class to target classes y"):
        build_label_map({"a": "x", "b": "x", "c": None}, source, target)
    with pytest.raises(LabelMapError, match="names classes d that the model does not have"):
        build_label_map({"a": "x", "b": "y", "c": "y", "d": "x"}, source, target)
    path = tmp_path / "map.yaml"
    path.write_text("mapping: {a: x, b: [y]}\n")
    with pytest.raises(LabelMapError, match="map.yaml: targets of b must be names or null"):
        load_label_map(path, source, target)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_label_map(tmp_path / "absent.yaml", source, target)


def test_mapped_probabilities_sum_and_renormalise():
    label_map = build_label_map({"a": "x", "b": "y", "c": "y", "d": None}, "abcd", ["x", "y"])
    probabilities = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0], [0.5, 0.25, 0.25, 0.0]])
    mapped = compute_mapped_probabilities(probabilities, label_map.matrix())
    np.testing.assert_allclose(mapped, [[1 / 6, 5 / 6], [0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(LabelMapError, match="do not fit a map of 4 source classes"):
        compute_mapped_probabilities(probabilities[:, :3], label_map.matrix())


class FixedTrainer:
    """Stands in for a trained model: fixed probabilities over the source classes."""

    class_names = ["normal_a", "normal_b", "low", "high"]

    def predict_probabilities(self, data):
        return np.array([[0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.7, 0.1], [0.0, 0.1, 0.1, 0.8]])


class TargetImages:
    labels = np.array([0, 1, 2])
    centers = ["site1", "site1", "site2"]


def test_evaluate_with_label_map_scores_in_the_target_classes():
    mapping = {"normal_a": "normal", "normal_b": "normal", "low": "lsil", "high": "hsil"}
    label_map = build_label_map(mapping, FixedTrainer.class_names, ["normal", "lsil", "hsil"])
    metrics = evaluate_with_label_map(FixedTrainer(), TargetImages(), label_map, ["lsil", "hsil"])
    assert metrics["accuracy"] == 1.0 and metrics["num_samples"] == 3
    assert set(metrics["per_center"]) == {"site1", "site2"} and "binary" in metrics
    wrong = build_label_map(
        {"a": "normal", "b": "lsil", "c": "hsil"}, "abc", ["normal", "lsil", "hsil"]
    )
    with pytest.raises(LabelMapError, match="was built for classes"):
        evaluate_with_label_map(FixedTrainer(), TargetImages(), wrong)
