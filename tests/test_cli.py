"""Smoke test of the README's main command: `python run_shell.py` with no flags runs the demo
sweep (here with fewer iterations and images) and ends with a table, report and figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_command_runs_the_demo_sweep(tmp_path, shared_cache):
    output = tmp_path / "demo"
    command = [
        sys.executable, "run_shell.py",
        "OUTPUT_DIR", str(output), "CACHE_DIR", str(shared_cache),
        "OPTIM.ITERS_PER_SHOT", "2", "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "24",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (output / "summary.md").read_text()
    for trainer in ("ZeroShotCLIP", "LinearProbe", "CLIPLoRA"):
        assert trainer in summary
    assert "target:center_b" in summary and "± " in summary
    assert (output / "report.md").exists()
    assert list((output / "figures").glob("*.png"))
    results = list(output.rglob("results.json"))
    assert len(results) == 3 * 3 * 2  # trainers x shot counts x seeds


def fewclip_command() -> str:
    """The console script pip installed beside this interpreter (pip install -e .)."""
    script = Path(sys.executable).parent / "fewclip"
    assert script.is_file(), f"{script} missing: install the project with pip install -e ."
    return str(script)


def test_installed_command_prints_help_from_any_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [fewclip_command(), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--sweep" in done.stdout and "--recipe" in done.stdout
    shell = subprocess.run(
        [sys.executable, str(ROOT / "run_shell.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    flags = [set(re.findall(r"--[a-z-]+", out.stdout)) for out in (done, shell)]
    assert shell.returncode == 0 and flags[0] == flags[1]  # one program, two names


def test_installed_command_runs_built_in_trainers_from_another_folder(tmp_path, shared_cache):
    """Outside the checkout, the built-in datasets and trainers are there (entry points)."""
    command = [
        fewclip_command(),
        "--recipe", str(ROOT / "configs/trainers/zeroshot.yaml"),
        "--dataset-config", str(ROOT / "configs/datasets/synthetic.yaml"),
        "--shots", "1", "--seeds", "1",
        "OUTPUT_DIR", "out", "CACHE_DIR", str(shared_cache),
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "out").rglob("results.json"))) == 1


def test_unknown_trainer_is_one_line_from_the_command(tmp_path):
    command = [
        fewclip_command(),
        "--recipe", str(ROOT / "configs/trainers/zeroshot.yaml"),
        "--dataset-config", str(ROOT / "configs/datasets/synthetic.yaml"),
        "--shots", "1", "--seeds", "1", "TRAINER.NAME", "ClipLoraa", "OUTPUT_DIR", "out",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "unknown trainer 'ClipLoraa'" in done.stderr and "CLIPLoRA" in done.stderr


def test_list_models_prints_families_models_and_the_trainers_that_apply(capsys):
    """Which trainers apply comes from what each trainer declares: the patch-token methods are
    not offered on a ResNet, zero-shot not on unaligned towers, only ViTTeacher on a teacher."""
    from fewclip.catalogue import FAMILIES, applicable_trainers
    from fewclip.cli import main
    from fewclip.registry import TRAINERS

    assert main(["--list-models"]) == 0
    printed = capsys.readouterr().out
    for text in ("hf-hub:microsoft/BiomedCLIP", "hf-hub:vinid/plip", "twin:resnet", "UNI"):
        assert text in printed
    trainers = [TRAINERS.get(name) for name in TRAINERS.names()]
    by_family = {family.name: applicable_trainers(family, trainers) for family in FAMILIES}
    assert {"SAVLT", "CaMVLA"} <= set(by_family["open_clip ViT"])
    assert not {"SAVLT", "CaMVLA"} & set(by_family["open_clip ResNet"])
    assert "ZeroShotCLIP" not in by_family["composed timm CNN + HF text (unaligned)"]
    assert by_family["image-only timm ViT (teacher)"] == ["ViTTeacher"]
    assert len(by_family["Hugging Face CLIPModel"]) == len(trainers)


def test_console_returns_the_status_and_freezes_the_collector_for_a_quick_exit(
    tmp_path, monkeypatch, capsys
):
    """The command's entry point: main's exit status, and everything alive moved to the
    collector's permanent generation, so the interpreter's exit does not walk torch's objects."""
    import gc

    from fewclip.cli import console

    monkeypatch.setattr(sys, "argv", ["fewclip", "--dry-run", "NO_SUCH.KEY", "1"])
    gc.unfreeze()
    try:
        assert console() == 2  # a config error: main's status comes back
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the test process goes on collecting
    assert "config error: unknown config key NO_SUCH" in capsys.readouterr().err
