"""What the command imports on its short paths: `--help`, `--aggregate`, a config error and
`--dry-run` must not pay for modules they never use (a test of which modules load, not of time).

One fresh interpreter runs the paths in order, lightest first, and reports after each which of
the heavy modules are in sys.modules (a module, once imported, stays; so order matters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "torch", "open_clip", "peft", "scipy", "matplotlib", "torch.utils.tensorboard", "tensorboard",
    "sklearn", "submitit", "timm", "transformers", "scipy.stats", "transformers.modeling_utils",
)  # fmt: skip
TORCH_SIDE = tuple(name for name in HEAVY if name != "torch")

PROBE = """
import contextlib, io, json, sys
import fewclip.cli

HEAVY = {heavy!r}
steps = {{}}

def step(name, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = fewclip.cli.main(argv)
        except SystemExit as exit:
            status = exit.code
    loaded = [module for module in HEAVY if module in sys.modules]
    plugins = [module for module in ("fewclip_trainers",) if module in sys.modules]
    text = out.getvalue()[-400:]
    steps[name] = {{"status": status, "loaded": loaded, "plugins": plugins, "out": text}}

steps["import"] = {{"status": 0, "loaded": [m for m in HEAVY if m in sys.modules], "out": ""}}
step("help", ["--help"])
step("aggregate", ["--aggregate", {empty!r}])
step("config_error", ["--dry-run", "OUTPUT_DIR", {output!r}, "NO_SUCH.KEY", "1"])
step("dry_run", ["--dry-run", "OUTPUT_DIR", {output!r}])
step("one_run", {one_run!r})
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("startup")
    run = folder / "empty" / "Data" / "ZeroShotCLIP" / "r" / "shots_1" / "seed_1"
    run.mkdir(parents=True)  # one finished cell: --aggregate has something to read
    config = {"DATASET": {"NAME": "Data", "NUM_SHOTS": 1}, "TRAINER": {"NAME": "ZeroShotCLIP"}}
    config.update(RECIPE="r", SEED=1)
    metrics = {"test": {"accuracy": 0.5, "balanced_accuracy": 0.5}}
    results = {"status": "complete", "config": config, "metrics": metrics}
    (run / "results.json").write_text(json.dumps(results))
    one_run = [
        "--recipe", str(ROOT / "configs/trainers/clip_lora.yaml"),
        "--dataset-config", str(ROOT / "configs/datasets/synthetic.yaml"),
        "--shots", "1", "--seeds", "1", "MODEL.NAME", "tiny-vit", "OPTIM.ITERS_PER_SHOT", "2",
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "4", "DATASET.SYNTHETIC.IMAGE_SIZE", "32",
        "OUTPUT_DIR", str(folder / "one"), "CACHE_DIR", str(folder / "cache"),
    ]  # fmt: skip
    code = PROBE.format(
        heavy=HEAVY, empty=str(folder / "empty"), output=str(folder / "out"), one_run=one_run
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "folder": folder}


@pytest.mark.parametrize("name", ["import", "help"])
def test_light_paths_import_no_torch(steps, name):
    """Importing the CLI and `--help` load no heavy module, not even torch."""
    assert steps[name]["status"] == 0, steps[name]["out"]
    assert steps[name]["loaded"] == [], f"{name} imported {steps[name]['loaded']}"


@pytest.mark.parametrize("name", ["config_error", "dry_run"])
def test_config_paths_skip_torch_side_modules(steps, name):
    """A config error and `--dry-run` load the trainers (so torch) but no model, LoRA, plotting,
    statistics or cluster library: those are imported where a run or a report uses them."""
    assert steps[name]["status"] == (2 if name == "config_error" else 0), steps[name]["out"]
    loaded = [module for module in steps[name]["loaded"] if module in TORCH_SIDE]
    assert loaded == [], f"{name} imported {loaded}"


def test_aggregate_skips_torch_side_modules(steps):
    """`--aggregate` reads results.json files: no torch, plugins, models, plots or cluster
    library."""
    assert steps["aggregate"]["status"] == 0, steps["aggregate"]["out"]
    loaded = steps["aggregate"]["loaded"]
    assert loaded == [], f"aggregate imported {loaded}"
    assert "fewclip_trainers" not in steps["aggregate"]["plugins"]


def test_one_run_skips_report_libraries(steps):
    """A one-cell CLIP-LoRA command on an open_clip model imports no more of the heavy modules
    than `import torch, open_clip` does (open_clip loads timm and transformers' top level): no
    peft or transformers' modelling (the LoRA layer is fewclip's), no scikit-learn, scipy or
    matplotlib (the metrics are numpy; the figures and report are left to `--report`), and it
    says so."""
    assert steps["one_run"]["status"] == 0, steps["one_run"]["out"]
    bare = ("torch", "open_clip", "timm", "transformers")
    loaded = [module for module in steps["one_run"]["loaded"] if module not in bare]
    assert loaded == [], f"a one-cell run imported {loaded}"
    (checkpoint,) = (steps["folder"] / "one").rglob("checkpoint.safetensors")
    with safe_open(str(checkpoint), framework="np") as handle:
        assert any(".lora_A.default." in name for name in handle.keys())  # it did train a LoRA
    folder = steps["folder"] / "one"
    assert (folder / "summary.md").is_file() and not (folder / "report.md").exists()
    assert f"(figures and report: fewclip --report {folder})" in steps["one_run"]["out"]


def test_dry_run_lists_the_demo_cells(steps):
    assert "18 cells: 18 todo" in steps["dry_run"]["out"]
