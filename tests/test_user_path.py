"""The user's path on their own data (issue 14): cross-dataset rows in every table, display
names, errors caught once before the first cell, skipped images counted, run folders tidy."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fewclip.config import ConfigError, build_config
from fewclip.data import Item
from fewclip.report import write_report
from fewclip.sweep import build_sweep, run_cells

ROOT = Path(__file__).resolve().parent.parent
ZEROSHOT = str(ROOT / "configs" / "trainers" / "zeroshot.yaml")
SYNTHETIC = str(ROOT / "configs" / "datasets" / "synthetic.yaml")


def folder_opts(fast_opts: list[str]) -> list[str]:
    """fast_opts without the synthetic dataset's own keys (for image-folder datasets)."""
    pairs = zip(fast_opts[0::2], fast_opts[1::2])
    return [part for key, value in pairs if "SYNTHETIC" not in key for part in (key, value)]


def cross_target(tmp_path: Path, image_tree) -> tuple[Path, Path]:
    """A 3-class image folder (low, high, scc) and a map from the synthetic classes dropping scc."""
    root = image_tree({"low": 3, "high": 3, "scc": 2}, tmp_path / "bethesda")
    dataset_yaml = tmp_path / "my_bethesda.yaml"
    dataset_yaml.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    label_map = tmp_path / "map.yaml"
    label_map.write_text(
        "mapping: {normal: low, lsil: low, hsil: high, carcinoma: high}\ndrop: [scc]\n"
    )
    return dataset_yaml, label_map


def test_cross_dataset_rows_reach_every_table_and_drop_is_counted(
    fast_opts, image_tree, tmp_path, caplog
):
    dataset_yaml, label_map = cross_target(tmp_path, image_tree)
    opts = [*fast_opts, "EVAL.CROSS_DATASET", str(dataset_yaml), "EVAL.LABEL_MAP", str(label_map)]
    sweep = build_sweep(None, [SYNTHETIC], [ZEROSHOT], [2], [1, 2], opts)
    results = run_cells(sweep.cells)
    assert [r["status"] for r in results] == ["complete", "complete"], results[0].get("error")
    assert "drops 2 scc images" in caplog.text
    cross = results[0]["metrics"]["cross_dataset"]
    name = cross["dataset"]
    assert cross["class_names"] == ["high", "low"] and cross["num_samples"] == 6
    assert cross["root"] == str(tmp_path / "bethesda")
    assert cross["dataset_config"] == str(dataset_yaml)
    assert cross["dropped"] == {"classes": ["scc"], "images": {"scc": 2}}
    _, terminal = write_report(sweep.root)
    assert f"cross:{name}" in terminal
    rows = list(csv.DictReader((sweep.root / "summary.csv").open()))
    cross_rows = [row for row in rows if row["eval_set"] == f"cross:{name}"]
    assert len(cross_rows) == 1 and cross_rows[0]["seeds"] == "2"
    assert cross_rows[0]["balanced_accuracy_n"] == "2"
    assert f"cross:{name}" in (sweep.root / "summary.md").read_text()
    assert f"cross:{name}" in (sweep.root / "report.md").read_text()


def test_list_opts_take_yaml_syntax_as_one_value(tmp_path):
    cfg = build_config(
        None,
        None,
        [
            "DATASET.CLASS_NAMES", "[NILM,LSIL,HSIL]",
            "EVAL.CROSS_DATASET_OPTS", "[DATASET.CLASS_NAMES, [NILM, LSIL, HSIL]]",
        ],
    )  # fmt: skip
    assert cfg.DATASET.CLASS_NAMES == ["NILM", "LSIL", "HSIL"]
    assert len(cfg.EVAL.CROSS_DATASET_OPTS) == 2
    inner = build_config(None, None, list(cfg.EVAL.CROSS_DATASET_OPTS))
    assert inner.DATASET.CLASS_NAMES == ["NILM", "LSIL", "HSIL"]


def test_label_map_drop_errors_name_the_classes():
    from fewclip.label_map import LabelMapError, build_label_map

    mapping = {"a": "x", "b": "y"}
    kept = build_label_map(mapping, ["a", "b"], ["x", "y", "z"], drop=["z"])
    assert kept.target_classes == ["x", "y"] and kept.dropped == ["z"]
    with pytest.raises(LabelMapError, match="drop: "):
        build_label_map(mapping, ["a", "b"], ["x", "y", "z"])
    with pytest.raises(LabelMapError, match="drops w, which are not target classes"):
        build_label_map(mapping, ["a", "b"], ["x", "y", "z"], drop=["w", "z"])
    with pytest.raises(LabelMapError, match="maps b to a dropped class"):
        build_label_map(mapping, ["a", "b"], ["x", "y"], drop=["y"])


def test_display_names_name_run_folders_and_a_shared_folder_fails_at_expansion(
    fast_opts, image_tree, tmp_path
):
    from fewclip.config import ConfigError
    from fewclip.run import resolve_run_dir

    root = image_tree({"low": 4, "high": 4}, tmp_path / "data")
    first, second = tmp_path / "site_a.yaml", tmp_path / "site_b.yaml"
    first.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    second.write_text(first.read_text())
    opts = folder_opts(fast_opts)
    sweep = build_sweep(None, [str(first), str(second)], [ZEROSHOT], [1], [1], opts)
    folders = [resolve_run_dir(cfg).relative_to(sweep.root).parts[0] for cfg in sweep.configs]
    assert folders == ["site_a", "site_b"]
    assert build_config(None, SYNTHETIC, fast_opts).DATASET.DISPLAY_NAME == "SyntheticMultiCenter"
    second.write_text(first.read_text() + "  DISPLAY_NAME: site_a\n")
    with pytest.raises(ConfigError, match=f"{first}.*{second}.*DISPLAY_NAME"):
        build_sweep(None, [str(first), str(second)], [ZEROSHOT], [1], [1], opts)


def test_every_user_mistake_is_one_line_with_the_fix(fast_opts, tmp_path, capsys):
    from fewclip.cli import main, parse_args
    from fewclip.config import ConfigError
    from fewclip.registry import TRAINERS, RegistryError
    from fewclip.shots import SplitError, sample_few_shot

    with pytest.raises(RegistryError, match="did you mean 'CLIPLoRA'"):
        TRAINERS.get("ClipLoRA")
    lora = str(ROOT / "configs" / "trainers" / "clip_lora.yaml")
    with pytest.raises(ConfigError, match="overrides CLIPLoRA of recipe .*clip_lora.yaml"):
        build_config(lora, SYNTHETIC, [*fast_opts, "TRAINER.NAME", "LinearProbe"])
    renamed = build_config(ZEROSHOT, SYNTHETIC, [*fast_opts, "TRAINER.NAME", "LinearProbe",
                                                 "RECIPE", "probe"])  # fmt: skip
    assert renamed.TRAINER.NAME == "LinearProbe" and renamed.RECIPE == "probe"
    savlt = str(ROOT / "configs" / "trainers" / "savlt.yaml")
    with pytest.raises(ConfigError, match="SAVLT.SAMPLER.*did you mean 'uniform'"):
        build_config(savlt, SYNTHETIC, [*fast_opts, "TRAINER.SAVLT.SAMPLER", "Uniform"])
    with pytest.raises(ConfigError, match="did you mean OPTIM.LR"):
        build_config(None, None, ["OPTIM.LEARNING_RATE", "1e-3"])
    items = [
        Item(f"/d/{name}/{i}.png", label, name)
        for label, (name, count) in enumerate([("a", 5), ("b", 1), ("c", 2)])
        for i in range(count)
    ]
    with pytest.raises(SplitError, match=r"classes 'b' \(1 training images\), 'c' \(2 training"):
        sample_few_shot(items, 4, seed=0)
    args = parse_args(["--shots", "1", "2", "OPTIM.LR", "1e-3", "--dry-run", "SEED", "3"])
    assert args.dry_run and args.shots == [1, 2] and args.opts == ["OPTIM.LR", "1e-3", "SEED", "3"]

    bad_root = tmp_path / "clinic.yaml"
    bad_root.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {tmp_path / 'nowhere'}\n")
    argv = ["--recipe", ZEROSHOT, "--dataset-config", str(bad_root), "--shots", "1", "2", "4",
            *folder_opts(fast_opts), "--seeds", "1", "2", "3", "4", "--dry-run"]  # fmt: skip
    assert main(argv) == 2  # 12 cells, one dataset: parsed once, one line, before any cell
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.count("does not exist") == 1
    assert f"dataset {bad_root}" in error and not (tmp_path / "output").exists()


def test_skipped_unreadable_images_are_warned_and_counted(fast_opts, image_tree, tmp_path, caplog):
    from fewclip.run import execute_run

    root = image_tree({"low": 6, "high": 6}, tmp_path / "data")
    broken = root / "high" / "img_002.png"
    broken.write_bytes(b"not an image")
    dataset_yaml = tmp_path / "clinic.yaml"
    dataset_yaml.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    every_image = ["DATASET.NUM_SHOTS", "100", "DATASET.INSUFFICIENT_SHOTS", "take_all"]
    opts = [*folder_opts(fast_opts), *every_image, "DATASET.VAL_SHOTS", "0"]
    failed = execute_run(build_config(ZEROSHOT, dataset_yaml, opts))
    assert failed["status"] == "failed" and "img_002.png" in failed["error"]
    opts += ["DATASET.SKIP_UNREADABLE", "True", "OUTPUT_DIR", str(tmp_path / "skip")]
    results = execute_run(build_config(ZEROSHOT, dataset_yaml, opts))
    assert results["status"] == "complete", results.get("error")
    skipped = results["skipped_unreadable"]
    assert skipped["count"] == 1 and skipped["files"] == [str(broken)]
    assert sum(skipped["by_set"].values()) == 1
    assert f"skipping unreadable image {broken}" in caplog.text


def test_a_corrupt_image_anywhere_in_the_pool_stops_the_sweep_before_the_first_cell(
    fast_opts, image_tree, tmp_path, caplog
):
    """At 1 shot the broken file would not be drawn by every seed; the sweep still names it
    before any cell runs. SKIP_UNREADABLE warns per file and runs; CHECK_IMAGES False skips the
    check (the cells then meet the file only if they draw it)."""
    import logging

    root = image_tree({"low": 6, "high": 6}, tmp_path / "data")
    broken = root / "high" / "img_004.png"
    broken.write_bytes(b"\xff\xd8 truncated")
    dataset_yaml = tmp_path / "clinic.yaml"
    dataset_yaml.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    opts = [*folder_opts(fast_opts), "DATASET.NUM_SHOTS", "1", "OUTPUT_DIR", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=f"dataset {dataset_yaml}: cannot read image {broken}"):
        build_sweep(None, [str(dataset_yaml)], [ZEROSHOT], [1], [1, 2], opts)
    assert not (tmp_path / "o").exists()
    with caplog.at_level(logging.WARNING, logger="fewclip.preflight"):
        build_sweep(
            None,
            [str(dataset_yaml)],
            [ZEROSHOT],
            [1],
            [1],
            [*opts, "DATASET.SKIP_UNREADABLE", "True"],
        )
    assert f"cannot read image {broken}" in caplog.text and "left out" in caplog.text
    build_sweep(
        None, [str(dataset_yaml)], [ZEROSHOT], [1], [1], [*opts, "DATASET.CHECK_IMAGES", "False"]
    )


def test_run_lock_is_removed_and_the_cache_is_not_in_the_working_directory(
    fast_opts, tmp_path, monkeypatch
):
    from fewclip.config import get_cfg_defaults
    from fewclip.run import cell_lock, execute_run

    results = execute_run(build_config(ZEROSHOT, SYNTHETIC, fast_opts))
    assert results["status"] == "complete" and not (Path(results["run_dir"]) / "run.lock").exists()
    run_dir = tmp_path / "cell"
    with cell_lock(run_dir) as first:
        assert first and (run_dir / "run.lock").exists()
        with cell_lock(run_dir) as second:
            assert not second  # held: the second process skips the cell
    assert not (run_dir / "run.lock").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    monkeypatch.chdir(tmp_path)
    assert get_cfg_defaults().CACHE_DIR == str(tmp_path / "user_cache" / "fewclip")


def test_summary_cells_carry_the_ci_and_flag_few_seeds():
    from fewclip.aggregate import format_cell, summarise_values

    assert format_cell(summarise_values([0.5])) == "50.0 ± n/a (CI n/a)"
    two = format_cell(summarise_values([0.4, 0.6]))  # t(0.975, 1) * 0.1414 / sqrt(2) = 1.27
    assert two == "50.0 ± 14.1 (CI ±127.1*)"
    three = format_cell(summarise_values([0.4, 0.5, 0.6]))  # t(0.975, 2) * 0.1 / sqrt(3)
    assert three == "50.0 ± 10.0 (CI ±24.8)"


def test_equal_curves_get_distinct_styles_and_bars_claim_no_missing_hatch(tmp_path, monkeypatch):
    import fewclip.figures as figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure) or Path(path))
    summary = {"mean": 0.5, "std": 0.02, "n": 2, "ci95": 0.1}
    rows = [
        {"trainer": name, "recipe": "r", "shots": shots, "eval_set": "in-domain", "worst": False,
         "balanced_accuracy": summary}
        for name in ("A", "B") for shots in (1, 2)
    ]  # fmt: skip
    figures.plot_metric_vs_shots(rows, "balanced_accuracy", tmp_path / "curve.png")
    lines = drawn[0].axes[0].get_lines()
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == len(lines) == 2
    figures.plot_center_bars(rows, "balanced_accuracy", 2, tmp_path / "bars.png")
    assert drawn[1].axes[0].get_title() == "2 shots per class"  # nothing hatched, none claimed
