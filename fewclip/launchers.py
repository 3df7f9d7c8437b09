"""Launching a sweep beyond this machine: a SLURM job array through submitit.

Every cell becomes one task of a single job array; a task runs `fewclip.sweep` on its cell, so
completed cells are skipped and an interrupted run resumes from its training checkpoint. On
preemption or timeout the task is requeued (submitit's Checkpointable). The "submitit-local"
launcher runs the same job array as local processes (submitit's LocalExecutor), for testing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewclip.config import ConfigError
from fewclip.registry import loaded_plugins, restore_plugins
from fewclip.sweep import Cell, run_cell

if TYPE_CHECKING:  # submitit is imported where a job is submitted, not by `fewclip --help`
    import submitit

LOGGER = logging.getLogger(__name__)
LAUNCHERS = ("local", "slurm", "submitit-local")
# Sweep-file `slurm:` keys (and the matching CLI flags), with their meaning and defaults.
SLURM_KEYS = {
    "partition": "",  # SLURM partition; "" = the cluster's default
    "gpus": 1,  # GPUs per task
    "cpus": 8,  # CPU cores per task
    "mem_gb": 32,  # memory per task in GB
    "time": 240,  # wall-clock limit per task in minutes
    "array_parallelism": 32,  # tasks of the array running at once
    "folder": "",  # submitit logs and pickles; "" = <sweep folder>/slurm
}


def resolve_slurm_options(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- sweep-file `slurm:` mapping <- CLI flags (None = unset); unknown keys fail."""
    unknown = sorted(set(spec) - set(SLURM_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown slurm keys {unknown} in sweep file; allowed: {list(SLURM_KEYS)}"
        )
    options = {**SLURM_KEYS, **spec}
    options.update({key: value for key, value in overrides.items() if value is not None})
    for key, default in SLURM_KEYS.items():
        try:
            options[key] = type(default)(options[key])
        except (TypeError, ValueError):
            raise ConfigError(
                f"slurm {key} must be {type(default).__name__}, got {options[key]!r}"
            ) from None
    check_slurm_options(options)
    return options


# What SLURM accepts (and what cannot break out of an #SBATCH line of the generated script).
PARTITION_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
FOLDER_PATTERN = re.compile(r"[A-Za-z0-9_./%+=@:~-]+")
MINIMUM = {"gpus": 0, "cpus": 1, "mem_gb": 1, "time": 1, "array_parallelism": 1}


def check_slurm_options(options: dict[str, Any]) -> None:
    """Refuse a field SLURM would not accept (a newline in a partition would put a command in
    the job script): partition names are letters, digits, `_.-` and commas; the folder a path
    without spaces, quotes or control characters; the counts at least their minimum."""
    partition, folder = options["partition"], options["folder"]
    if partition and not PARTITION_PATTERN.fullmatch(partition):
        raise ConfigError(
            f"slurm partition {partition!r} is not a SLURM partition name: use letters, digits, "
            "'_', '.', '-' (several: comma-separated)"
        )
    if folder and not FOLDER_PATTERN.fullmatch(folder):
        raise ConfigError(
            f"slurm folder {folder!r} may hold only letters, digits and _./%+=@:~- (no spaces, "
            "quotes or control characters)"
        )
    for key, minimum in MINIMUM.items():
        if options[key] < minimum:
            raise ConfigError(f"slurm {key} must be at least {minimum}, got {options[key]}")


class CellTask:
    """One array task: run one cell (skips it when complete; resumes from its checkpoint).

    On preemption or timeout submitit calls `checkpoint` and requeues what it returns (the same
    duck-typed protocol as submitit.helpers.Checkpointable, without importing submitit here).

    It carries the plugin modules and paths of the submitting process and loads them first, so
    the task knows the same datasets and trainers (fewclip must be installed where it runs).
    """

    def __init__(self, plugins: dict[str, list[str]] | None = None) -> None:
        self.plugins = plugins if plugins is not None else loaded_plugins()

    def __call__(self, cell: Cell, extra_opts: tuple[str, ...] = ()) -> dict[str, Any]:
        restore_plugins(self.plugins)
        result = run_cell(cell, extra_opts)
        keep = ("status", "error", "run_dir", "skipped")
        return {key: result[key] for key in keep if key in result}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue this task with the same arguments (run_cell resumes from its checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def build_executor(launcher: str, folder: str | Path, options: dict[str, Any]) -> submitit.Executor:
    """A submitit executor for "slurm" or "submitit-local" with the resolved options."""
    if launcher not in ("slurm", "submitit-local"):
        raise ConfigError(f"unknown launcher {launcher!r}; choose one of {list(LAUNCHERS)}")
    import submitit

    cluster = "slurm" if launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    parameters: dict[str, Any] = {
        "name": "fewclip",
        "timeout_min": options["time"],
        "cpus_per_task": options["cpus"],
        "mem_gb": options["mem_gb"],
    }
    if cluster == "slurm":
        parameters.update(
            gpus_per_node=options["gpus"],
            slurm_array_parallelism=options["array_parallelism"],
            slurm_partition=options["partition"] or None,
        )
    executor.update_parameters(**parameters)
    return executor


def submit_cells(
    cells: Sequence[Cell],
    launcher: str,
    folder: str | Path,
    options: dict[str, Any],
    extra_opts: Sequence[str] = (),
) -> list[submitit.Job]:
    """Submit all cells as one job array; returns the jobs (one per cell, in cell order)."""
    if not cells:
        return []
    executor = build_executor(launcher, folder, options)
    extra = tuple(extra_opts)
    jobs = executor.map_array(CellTask(), list(cells), [extra] * len(cells))
    LOGGER.info("submitted %d cells as job array %s", len(jobs), jobs[0].job_id.split("_")[0])
    return jobs


def wait_for_jobs(jobs: Sequence[submitit.Job]) -> list[dict[str, Any]]:
    """Block until every task ends; a task that crashed becomes a failed result, not an error."""
    results = []
    for job in jobs:
        try:
            results.append(job.result())
        except Exception as error:  # submitit raises the task's failure; keep the others going
            message = str(error).strip().splitlines()
            results.append(
                {"status": "failed", "error": f"job {job.job_id}: {message[-1] if message else ''}"}
            )
    return results
