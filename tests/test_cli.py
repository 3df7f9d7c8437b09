"""Smoke test of the README's main command: `python run_shell.py` with no flags runs the demo
sweep (here with fewer iterations and images) and ends with a table, report and figures."""

from __future__ import annotations

import os
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
