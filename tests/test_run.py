"""One run end to end: results.json contents, skip when complete, refusal to mix configs,
diverged and failed status, and reproducibility to the last digit on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewclip.config import build_config
from fewclip.results import read_results
from fewclip.run import execute_run, resolve_run_dir

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "trainers"
SYNTHETIC = ROOT / "configs" / "datasets" / "synthetic.yaml"


def run(recipe: str, opts: list[str]) -> dict:
    return execute_run(build_config(RECIPES / recipe, SYNTHETIC, opts))


def test_results_json_is_complete_and_rerun_skips(fast_opts):
    results = run("clip_lora.yaml", fast_opts)
    assert results["status"] == "complete"
    run_dir = Path(results["run_dir"])
    assert run_dir.parts[-5:] == (
        "SyntheticMultiCenter",
        "CLIPLoRA",
        "clip_lora",
        "shots_2",
        "seed_1",
    )
    stored = read_results(run_dir)
    assert stored["schema_version"] == 1
    assert stored["config"]["TRAINER"]["NAME"] == "CLIPLoRA"
    assert stored["provenance"]["packages"]["torch"]
    assert stored["split"]["sha1"] and stored["weights"].startswith("tiny-vit")
    assert set(stored["metrics"]["targets"]) == {"center_b", "center_c"}
    assert stored["metrics"]["test"]["binary"]["positive_classes"] == ["hsil", "carcinoma"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoint.safetensors").exists()
    again = run("clip_lora.yaml", fast_opts)
    assert again["skipped"] is True


def test_complete_folder_with_other_config_is_refused(fast_opts):
    run("zeroshot.yaml", fast_opts)
    with pytest.raises(ValueError, match="different config"):
        run("zeroshot.yaml", [*fast_opts, "TRAINER.ZEROSHOTCLIP.PROMPT_LEVEL", "short"])


def test_nan_loss_gives_diverged_status_with_step(fast_opts):
    results = run("clip_lora.yaml", [*fast_opts, "OPTIM.LR", "1e30", "OPTIM.MAX_ITERS", "6"])
    assert results["status"] == "diverged"
    assert isinstance(results["diverged_step"], int)
    assert read_results(results["run_dir"])["status"] == "diverged"


def test_failed_run_keeps_its_traceback(fast_opts, tmp_path):
    results = run("zeroshot.yaml", [*fast_opts, "DATASET.NUM_SHOTS", "500"])
    assert results["status"] == "failed"
    assert "shots" in results["error"]
    assert (Path(results["run_dir"]) / "traceback.txt").exists()


def test_same_config_gives_identical_metrics_and_split_files(fast_opts, tmp_path):
    first = run("clip_lora.yaml", fast_opts)
    second_opts = [*fast_opts, "OUTPUT_DIR", str(tmp_path / "second")]
    second = run("clip_lora.yaml", second_opts)
    assert json.dumps(first["metrics"], sort_keys=True) == json.dumps(
        second["metrics"], sort_keys=True
    )
    assert first["split"]["sha1"] == second["split"]["sha1"]
    assert Path(first["split"]["file"]).read_bytes() == Path(second["split"]["file"]).read_bytes()


def test_run_folder_layout(fast_opts):
    cfg = build_config(RECIPES / "clip_lora.yaml", SYNTHETIC, [*fast_opts, "SEED", "3"])
    path = resolve_run_dir(cfg)
    assert path.parts[-4:] == ("CLIPLoRA", "clip_lora", "shots_2", "seed_3_split_1")


def test_cross_dataset_evaluation_through_a_label_map(fast_opts, image_tree, tmp_path):
    other_root = image_tree({"low": 3, "high": 3}, tmp_path / "other")
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {other_root}\n")
    label_map = tmp_path / "map.yaml"
    label_map.write_text("mapping:\n  normal: low\n  lsil: low\n  hsil: high\n  carcinoma: high\n")
    opts = [*fast_opts, "EVAL.CROSS_DATASET", str(other_yaml), "EVAL.LABEL_MAP", str(label_map)]
    results = run("zeroshot.yaml", opts)
    assert results["status"] == "complete", results.get("error")
    cross = results["metrics"]["cross_dataset"]
    assert cross["num_samples"] == 6 and len(cross["confusion_matrix"]) == 2

    label_map.write_text("mapping:\n  normal: low\n  lsil: low\n  hsil: high\n")
    failed = run("zeroshot.yaml", [*opts, "OUTPUT_DIR", str(tmp_path / "again")])
    assert failed["status"] == "failed" and "carcinoma" in failed["error"]
