"""Faults: a killed run, two processes on one cell, an unwritable output folder.

Each promise of the README's "What happens when things go wrong" section has a test here or
next to the code it concerns (config, data, weights, splits, sweeps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD

from fewclip.config import build_config
from fewclip.hooks import STATE_FILE
from fewclip.results import read_results
from fewclip.run import OutputError, cell_lock, execute_run, resolve_run_dir

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "trainers" / "clip_lora.yaml"
SYNTHETIC = ROOT / "configs" / "datasets" / "synthetic.yaml"


def test_read_only_output_folder_fails_before_training(fast_opts, tmp_path):
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root without CAP drop)")
        cfg = build_config(RECIPE, SYNTHETIC, [*fast_opts, "OUTPUT_DIR", str(locked)])
        with pytest.raises(OutputError, match="is not writable"):
            execute_run(cfg)
    finally:
        locked.chmod(0o700)


def test_output_path_under_a_file_fails_with_a_clear_message(fast_opts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = build_config(RECIPE, SYNTHETIC, [*fast_opts, "OUTPUT_DIR", str(blocker / "out")])
    with pytest.raises(OutputError, match="a_file/out/.* is not writable"):
        execute_run(cfg)


def test_a_cell_held_by_another_process_is_left_alone(fast_opts):
    cfg = build_config(RECIPE, SYNTHETIC, fast_opts)
    run_dir = resolve_run_dir(cfg)
    with cell_lock(run_dir) as acquired:
        assert acquired
        result = execute_run(cfg)
    assert result["status"] == "locked" and result["skipped"]
    assert read_results(run_dir) is None  # the other "process" owns the cell
    assert execute_run(cfg)["status"] == "complete"  # once free, it runs


RUNNER = """
import sys
from fewclip.config import build_config
from fewclip.registry import load_installed_plugins
from fewclip.run import execute_run
load_installed_plugins()
cfg = build_config(sys.argv[1], sys.argv[2], sys.argv[3:])
print(execute_run(cfg)["status"])
"""


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_completes(fast_opts, tmp_path):
    opts = [*fast_opts, "OPTIM.MAX_ITERS", "600", "CHECKPOINT.EVERY", "25"]
    cfg = build_config(RECIPE, SYNTHETIC, opts)
    run_dir = resolve_run_dir(cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", RUNNER, str(RECIPE), str(SYNTHETIC), *opts]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE)
    while not (run_dir / STATE_FILE).exists() and process.poll() is None:
        time.sleep(0.1)  # until the first training state is saved: we are inside training
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    results = read_results(run_dir)
    assert results is None or results["status"] != "complete"  # never a partial "complete"
    rerun = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD
    )
    assert rerun.stdout.strip().splitlines()[-1] == "complete", rerun.stderr[-2000:]
    results = read_results(run_dir)
    assert results["status"] == "complete"
    assert results["training"]["resumed_from_step"] > 0  # continued from the saved state


def test_an_image_rewritten_in_place_changes_the_recorded_files_key(
    fast_opts, image_tree, tmp_path
):
    """The split file's hash cannot see image content; results.json records the split's files as
    read (path, size, mtime, ctime, inode): a test image rewritten with its old mtime restored
    (`cp -p`) gives another key, an unchanged tree the same one."""
    import json

    root = image_tree({"low": 6, "high": 6}, tmp_path / "data")
    dataset = tmp_path / "clinic.yaml"
    dataset.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    pairs = zip(fast_opts[0::2], fast_opts[1::2])
    opts = [part for key, value in pairs if "SYNTHETIC" not in key for part in (key, value)]
    zeroshot = ROOT / "configs" / "trainers" / "zeroshot.yaml"

    def run(output: str) -> dict:
        cfg = build_config(zeroshot, dataset, [*opts, "OUTPUT_DIR", str(tmp_path / output)])
        return execute_run(cfg)["split"]

    first = run("a")
    assert run("b")["files_key"] == first["files_key"]
    test_image = root / json.loads(Path(first["file"]).read_text())["test"][0][0]
    stat = test_image.stat()
    test_image.write_bytes(test_image.read_bytes()[::-1][::-1])  # rewritten in place
    os.utime(test_image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its old mtime restored
    again = run("c")
    assert again["sha1"] == first["sha1"] and again["files_key"] != first["files_key"]


def test_an_unreadable_test_image_stops_a_run_before_it_trains(fast_opts, image_tree, tmp_path):
    """Called directly (no sweep preflight), a run still builds its test and target sets before
    training: the error names the file and no checkpoint was written."""
    from fewclip.registry import DATASETS
    from fewclip.splits import build_split

    root = image_tree({"low": 6, "high": 6}, tmp_path / "data")
    dataset_yaml = tmp_path / "clinic.yaml"
    dataset_yaml.write_text(f"DATASET:\n  NAME: ImageFolder\n  ROOT: {root}\n")
    pairs = zip(fast_opts[0::2], fast_opts[1::2])
    opts = [part for key, value in pairs if "SYNTHETIC" not in key for part in (key, value)]
    cfg = build_config(RECIPE, dataset_yaml, [*opts, "OPTIM.MAX_ITERS", "2"])
    broken = build_split(DATASETS.get(cfg.DATASET.NAME)(cfg), cfg).test[0].path
    Path(broken).write_bytes(b"not an image")
    results = execute_run(cfg)
    assert results["status"] == "failed" and broken in results["error"]
    assert not (resolve_run_dir(cfg) / "checkpoint.safetensors").exists()
