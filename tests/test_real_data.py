"""Opt-in checks on the real images of the shared data folder (see /work/shared/data/README.md).

Run with `FEWCLIP_REAL_DATA=/path/to/data pytest -m real_data tests/test_real_data.py`; without
the variable (or the folder) every test here is skipped. Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from fewclip.config import build_config
from fewclip.run import execute_run
from fewclip.splits import build_split
from fewclip_datasets.herlev import Herlev, field_of_view
from fewclip_datasets.oral_scc import OralSCC

REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not (REAL_DATA / "herlev").is_dir(),
        reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run these",
    ),
]
HERLEV_COUNTS = {
    "normal_superficiel": 74,
    "normal_intermediate": 70,
    "normal_columnar": 98,
    "light_dysplastic": 182,
    "moderate_dysplastic": 146,
    "severe_dysplastic": 197,
    "carcinoma_in_situ": 150,
}


def herlev_config(tmp_path: Path, *opts: str):
    base = ["DATASET.ROOT", str(REAL_DATA / "herlev"), "OUTPUT_DIR", str(tmp_path / "out")]
    return build_config(None, "configs/datasets/herlev.yaml", [*base, *opts])


def test_herlev_parses_917_images_in_three_views(tmp_path):
    seven = Herlev(herlev_config(tmp_path))
    assert len(seven.items) == 917 and seven.count_table()["default"] == HERLEV_COUNTS
    binary = Herlev(herlev_config(tmp_path, "DATASET.HERLEV.VIEW", "binary"))
    assert binary.count_table()["default"] == {"normal": 242, "abnormal": 675}
    bethesda = Herlev(herlev_config(tmp_path, "DATASET.HERLEV.VIEW", "bethesda"))
    assert bethesda.count_table()["default"] == {"normal": 242, "lsil": 182, "hsil": 493}
    with open(REAL_DATA / "herlev" / "manifest.csv", newline="") as handle:
        manifest = {row["path"]: row["group"] for row in csv.DictReader(handle)}
    by_path = {str(Path(i.path).relative_to(seven.root)): i.group for i in seven.items}
    assert by_path == manifest and len(set(manifest.values())) == 538
    assert all(field_of_view(path) == group for path, group in manifest.items())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_herlev_splits_keep_fields_of_view_whole(tmp_path, seed):
    cfg = herlev_config(tmp_path, "DATASET.NUM_SHOTS", "16", "DATASET.SPLIT_SEED", str(seed))
    split = build_split(Herlev(cfg), cfg)
    groups = {part: {i.group for i in items} for part, items in
              (("train", split.train), ("val", split.val), ("test", split.test))}  # fmt: skip
    assert not groups["test"] & (groups["train"] | groups["val"])
    assert not groups["train"] & groups["val"]
    assert len(split.train) == 7 * 16 and 200 < len(split.test) < 350


def test_oral_scc_parses_both_magnifications(tmp_path):
    cfg = build_config(None, "configs/datasets/oral_scc.yaml", ["DATASET.ROOT", str(REAL_DATA)])
    dataset = OralSCC(cfg)
    assert dataset.count_table() == {
        "100x": {"Normal": 84, "OSCC": 435},
        "400x": {"Normal": 190, "OSCC": 483},
    }


def test_cross_magnification_run_100x_to_400x(tmp_path):
    opts = ["DATASET.ROOT", str(REAL_DATA), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += ["CACHE_DIR", str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit"]
    opts += ["DATASET.NUM_SHOTS", "4", "OPTIM.MAX_ITERS", "5", "OPTIM.BATCH_SIZE", "8"]
    cfg = build_config("configs/trainers/clip_lora.yaml", "configs/datasets/oral_scc.yaml", opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    metrics = results["metrics"]
    assert list(metrics["targets"]) == ["400x"]
    assert metrics["targets"]["400x"]["num_samples"] == 673
    assert 100 < metrics["test"]["num_samples"] < 519  # held-out 100x images (in-domain)
    for key in ("balanced_accuracy", "macro_f1", "auroc"):
        assert 0.0 <= metrics["targets"]["400x"][key] <= 1.0
    assert "binary" in metrics["targets"]["400x"]
    assert metrics["targets_summary"]["balanced_accuracy"]["worst_center"] == "400x"


def test_herlev_to_its_bethesda_view_is_a_cross_row_in_the_report(tmp_path):
    from fewclip.report import write_report
    from fewclip.sweep import build_sweep, run_cells

    root = str(REAL_DATA / "herlev")
    cross_opts = f"[DATASET.ROOT, {root}, DATASET.HERLEV.VIEW, bethesda]"
    opts = ["DATASET.ROOT", root, "OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR",
            str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit", "EVAL.CROSS_DATASET",
            "configs/datasets/herlev.yaml", "EVAL.CROSS_DATASET_OPTS", cross_opts,
            "EVAL.LABEL_MAP", "configs/label_maps/herlev7_to_bethesda3.yaml"]  # fmt: skip
    sweep = build_sweep(
        None,
        ["configs/datasets/herlev.yaml"],
        ["configs/trainers/zeroshot.yaml"],
        [1],
        [1, 2],
        opts,
    )
    results = run_cells(sweep.cells)
    assert all(r["status"] == "complete" for r in results), results[0].get("error")
    cross = results[0]["metrics"]["cross_dataset"]
    assert cross["dataset"] == "Herlev" and cross["num_samples"] == 917
    assert cross["class_names"] == ["normal", "lsil", "hsil"] and cross["root"] == root
    _, table = write_report(sweep.root)
    assert "cross:Herlev" in table and "cross:Herlev" in (sweep.root / "summary.csv").read_text()


def test_every_method_of_the_methods_sweep_runs_on_real_images_100x_to_400x(tmp_path):
    """configs/sweeps/methods.yaml (every registered trainer's recipe) on the oral images, trained
    on 100x and tested on 400x, a few iterations each: every cell completes and every method
    gets its in-domain and its 400x row."""
    from fewclip.aggregate import aggregate_folder
    from fewclip.sweep import build_sweep, run_cells

    opts = ["DATASET.ROOT", str(REAL_DATA), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += ["CACHE_DIR", str(tmp_path / "cache"), "OPTIM.MAX_ITERS", "3"]
    sweep = build_sweep(
        "configs/sweeps/methods.yaml", ["configs/datasets/oral_scc.yaml"], seeds=[1], opts=opts
    )
    results = run_cells(sweep.cells, jobs=1)
    failed = [(r.get("run_dir"), r.get("error")) for r in results if r["status"] != "complete"]
    assert not failed
    rows = aggregate_folder(tmp_path / "out")["rows"]
    recipes = {Path(cell.recipe).stem for cell in sweep.cells}
    for eval_set in ("in-domain", "target:400x"):
        assert {row["recipe"] for row in rows if row["eval_set"] == eval_set} == recipes
