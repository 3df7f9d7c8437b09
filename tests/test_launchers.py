"""SLURM through submitit: options from the sweep file and flags; a 2-cell job array run by
submitit's local executor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fewclip.config import ConfigError
from fewclip.launchers import (
    SLURM_KEYS,
    CellTask,
    build_executor,
    resolve_slurm_options,
    submit_cells,
    wait_for_jobs,
)
from fewclip.results import read_results
from fewclip.sweep import build_sweep, cell_statuses

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC = str(REPO / "configs" / "datasets" / "synthetic.yaml")
ZEROSHOT = str(REPO / "configs" / "trainers" / "zeroshot.yaml")


def test_slurm_options_defaults_file_then_flags():
    options = resolve_slurm_options(
        {"partition": "gpu", "time": 60, "array_parallelism": 4},
        {"time": 30, "gpus": None, "partition": None},
    )
    assert options["partition"] == "gpu"  # from the file
    assert options["time"] == 30  # the flag wins
    assert options["gpus"] == SLURM_KEYS["gpus"]  # default
    assert options["array_parallelism"] == 4
    with pytest.raises(ConfigError, match="partitoin"):
        resolve_slurm_options({"partitoin": "gpu"}, {})
    with pytest.raises(ConfigError, match="time must be int"):
        resolve_slurm_options({"time": "two hours"}, {})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("partition", "gpu\ntouch /tmp/owned", "not a SLURM partition name"),
        ("partition", "gpu; rm -rf ~", "not a SLURM partition name"),
        ("partition", "gpu,", "not a SLURM partition name"),
        ("folder", "logs\n#SBATCH --uid=0", "may hold only"),
        ("folder", "logs'$(id)'", "may hold only"),
        ("gpus", -1, "gpus must be at least 0"),
        ("time", 0, "time must be at least 1"),
        ("array_parallelism", 0, "array_parallelism must be at least 1"),
    ],
)
def test_slurm_fields_outside_what_slurm_accepts_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve_slurm_options({field: value}, {})
    assert "\n" not in str(error.value).replace(repr(value), "")
    ok = resolve_slurm_options({"partition": "gpu,gpu-long.a_1", "folder": "/scratch/u1/logs"}, {})
    assert ok["partition"] == "gpu,gpu-long.a_1"


def test_slurm_executor_gets_partition_gpus_time_and_array_parallelism(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    options = resolve_slurm_options({"partition": "a100", "gpus": 2, "array_parallelism": 3}, {})
    executor = build_executor("slurm", tmp_path / "logs", options)
    parameters = executor._executor.parameters  # submitit's sbatch parameters
    assert parameters["array_parallelism"] == 3
    script = executor._executor._make_submission_file_text("python task.py", "0")
    assert "#SBATCH --partition=a100" in script
    assert "#SBATCH --gpus-per-node=2" in script
    assert f"#SBATCH --time={SLURM_KEYS['time']}" in script
    assert "PYTHONPATH" not in script  # the installed package, never the checkout's folders
    task = CellTask()  # carries what this process registered to the task's fresh process
    assert {"fewclip_datasets", "fewclip_trainers"} <= set(task.plugins["modules"])
    with pytest.raises(ConfigError, match="launcher"):
        build_executor("kubernetes", tmp_path, options)


def test_cell_task_requeues_itself_with_the_same_cell():
    """On preemption submitit calls `checkpoint` and resubmits what it returns: the same task."""
    import submitit

    task, cell = CellTask(), build_sweep(None, [SYNTHETIC], [ZEROSHOT]).cells[0]
    delayed = task.checkpoint(cell, ())
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is task and delayed.args == (cell, ())


@pytest.mark.slow
def test_submitit_local_runs_a_two_cell_job_array(tmp_path: Path, shared_cache, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tasks share the cores
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sweep = build_sweep(
        None,
        [SYNTHETIC],
        [ZEROSHOT],
        seeds=[1, 2],
        opts=[
            "OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR", str(shared_cache),
            "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12", "DATASET.NUM_SHOTS", "1",
        ],
    )  # fmt: skip
    options = resolve_slurm_options({"time": 10}, {})
    jobs = submit_cells(sweep.cells, "submitit-local", tmp_path / "slurm", options)
    assert len(jobs) == 2
    results = wait_for_jobs(jobs)
    assert [r["status"] for r in results] == ["complete", "complete"], results
    assert cell_statuses(sweep.configs) == ["complete", "complete"]
    for result in results:
        assert read_results(result["run_dir"])["metrics"]["test"]["num_samples"] > 0
    assert any((tmp_path / "slurm").rglob("*_log.out"))  # submitit's per-task logs
