"""Figures and the sweep report, from hand-made results.json trees (no model runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fewclip.figures import plot_confusion_matrix, plot_reliability
from fewclip.report import write_report

CLASSES = ["normal", "lsil", "hsil"]


def metrics_for(accuracy: float) -> dict:
    """In-domain metrics with a 3-class confusion matrix and 4 reliability bins."""
    return {
        "accuracy": accuracy,
        "balanced_accuracy": accuracy,
        "ece": 0.1,
        "confusion_matrix": [[5, 1, 0], [2, 3, 1], [0, 1, 6]],
        "reliability": {
            "bin_confidence": [None, 0.4, 0.6, 0.9],
            "bin_accuracy": [None, 0.3, 0.7, 0.8],
            "bin_count": [0, 4, 6, 9],
        },
    }


def write_run(root: Path, trainer: str, shots: int, seed: int, accuracy: float) -> Path:
    run_dir = root / "Data" / trainer / "r" / f"shots_{shots}" / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    targets = {"center_b": {"balanced_accuracy": accuracy - 0.1, "accuracy": accuracy - 0.1}}
    targets["center_c"] = {"balanced_accuracy": accuracy - 0.2, "accuracy": accuracy - 0.2}
    results = {
        "status": "complete",
        "class_names": CLASSES,
        "config": {
            "DATASET": {"NAME": "Data", "NUM_SHOTS": shots, "SPLIT_SEED": seed},
            "TRAINER": {"NAME": trainer},
            "RECIPE": "r",
            "SEED": seed,
        },
        "metrics": {"test": metrics_for(accuracy), "targets": targets},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def make_sweep(root: Path, trainers: dict[str, float]) -> None:
    for trainer, base in trainers.items():
        for shots in (1, 2, 4):
            for seed in (1, 2):
                write_run(root, trainer, shots, seed, base + 0.05 * shots + 0.01 * seed)


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


def test_confusion_matrix_and_reliability_figures(tmp_path: Path):
    assert_png(plot_confusion_matrix([[5, 1], [0, 4]], ["benign", "malignant"], tmp_path / "c.png"))
    reliability = metrics_for(0.5)["reliability"]
    assert_png(plot_reliability(reliability, tmp_path / "r.png", "title"))


def test_report_embeds_tables_figures_failures_and_comparison(tmp_path: Path):
    root, baseline = tmp_path / "method", tmp_path / "baseline"
    make_sweep(root, {"LoRA": 0.5, "Probe": 0.4})
    make_sweep(baseline, {"ZeroShot": 0.3})
    failed = root / "Data" / "LoRA" / "r" / "shots_8" / "seed_1"
    failed.mkdir(parents=True)
    (failed / "results.json").write_text(json.dumps({"status": "failed", "error": "Boom: x"}))
    (failed / "traceback.txt").write_text("Traceback ...\nBoom: x\n")

    report, table = write_report(root, compare_with=baseline)
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "figures/Data_balanced_accuracy_vs_shots.png" in images
    assert "figures/Data_centers.png" in images
    for image in images:
        assert_png(root / image)
    for trainer in ("LoRA", "Probe"):  # every complete run has its own figures
        for shots in (1, 2, 4):
            for seed in (1, 2):
                run_dir = root / "Data" / trainer / "r" / f"shots_{shots}" / f"seed_{seed}"
                assert (run_dir / "confusion_matrix.png").is_file()
                assert (run_dir / "reliability.png").is_file()
    assert "Runs: 12 complete, 1 failed, 0 missing" in text
    assert "| Data      | LoRA      | r        |       4 | target:center_c (worst) |" in text
    assert "Boom: x" in text and "(Data/LoRA/r/shots_8/seed_1/traceback.txt)" in text
    assert f"## Comparison with {baseline}" in text and "Wilcoxon p" in text
    comparison = text.split("## Comparison with")[1]
    # LoRA - ZeroShot = 0.2 on both matched seeds: no t-test (zero variance), Wilcoxon p = 2/2^2
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in comparison.splitlines()]
    expected = ["Data", "LoRA/r", "ZeroShot/r", "1", "in-domain", "2", "56.5", "36.5", "+20.0"]
    assert [*expected, "± 0.0", "-", "0.5"] in rows
    assert "(worst)" in table and (root / "summary.csv").is_file()

    figure = root / "Data" / "LoRA" / "r" / "shots_1" / "seed_1" / "confusion_matrix.png"
    before = figure.stat().st_mtime_ns
    write_report(root)  # run figures newer than their results.json are kept
    assert figure.stat().st_mtime_ns == before


def test_every_eval_set_gets_a_confusion_matrix_in_its_own_classes(tmp_path: Path, monkeypatch):
    """Target centers and the cross-dataset target (labelled in the target's classes) get
    confusion_matrix_<eval set>.png beside the in-domain one, and the report embeds them."""
    import fewclip.figures

    drawn = {}
    plot = fewclip.figures.plot_confusion_matrix

    def recording(matrix, class_names, path, title=""):
        drawn[Path(path).name] = list(class_names)
        return plot(matrix, class_names, path, title)

    monkeypatch.setattr(fewclip.figures, "plot_confusion_matrix", recording)
    run_dir = write_run(tmp_path, "LoRA", 1, 1, 0.5)
    results = json.loads((run_dir / "results.json").read_text())
    results["metrics"]["targets"]["center_b"]["confusion_matrix"] = [
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 1],
    ]
    cross = {"dataset": "Bethesda", "class_names": ["NILM", "SIL"], "balanced_accuracy": 0.5}
    results["metrics"]["cross_dataset"] = {**cross, "confusion_matrix": [[3, 1], [2, 2]]}
    results["training"] = {"attention_maps": ["attention_maps/000_x_pred-hsil.png"]}
    (run_dir / "attention_maps").mkdir()
    plot_confusion_matrix([[1]], ["x"], run_dir / "attention_maps" / "000_x_pred-hsil.png")
    (run_dir / "results.json").write_text(json.dumps(results))
    report, _ = write_report(tmp_path)
    assert drawn == {
        "confusion_matrix.png": CLASSES,
        "confusion_matrix_target_center_b.png": CLASSES,
        "confusion_matrix_cross_Bethesda.png": ["NILM", "SIL"],
    }
    text = report.read_text()
    for name in drawn:
        assert_png(run_dir / name)
        assert f"shots_1/seed_1/{name})" in text
    assert "Attention maps (true class, prediction)" in text
    assert "shots_1/seed_1/attention_maps/000_x_pred-hsil.png)" in text


def test_one_shot_count_is_drawn_as_bars_not_a_column_of_dots(tmp_path: Path):
    for trainer, accuracy in (("LoRA", 0.6), ("Probe", 0.4)):
        for seed in (1, 2):
            write_run(tmp_path, trainer, 4, seed, accuracy + 0.01 * seed)
    report, _ = write_report(tmp_path)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert "figures/Data_centers.png" in images
    assert not any("vs_shots" in image for image in images)
    assert not (tmp_path / "figures" / "Data_balanced_accuracy_vs_shots.png").exists()
