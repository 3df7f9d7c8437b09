"""How many torch threads a process should run: the CPUs it may really use, shared by its workers.

`os.cpu_count()` counts the machine's cores, not this process's share: under `taskset`, a SLURM
allocation or a container CPU quota it over-counts, and torch's default (one thread per core)
then oversubscribes the cores. A tiny training step went from 0.12 s to 1-5 s on a 2-core
machine at load 5-13. The usable count is the smallest of the affinity mask,
`SLURM_CPUS_PER_TASK` and the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), and
`--jobs` workers divide it. `PERF.THREADS` (0 = this automatic count) overrides it per run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_CONFIGURED: int | None = None  # the count this process last set (None: torch's default)
_AUTOMATIC: int | None = None  # this process's automatic count, once known


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (quota / period), or None when unlimited or unknown.

    v2: `<root>/cpu.max` holds "max 100000" or "<quota> <period>". v1: `<root>/cpu/` (or
    `cpu,cpuacct/`) holds cpu.cfs_quota_us (-1 = unlimited) and cpu.cfs_period_us.
    """
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    for folder in ("cpu", "cpu,cpuacct"):
        with contextlib.suppress(OSError, ValueError):
            quota = int((root / folder / "cpu.cfs_quota_us").read_text())
            period = int((root / folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    return None


def available_cpus(
    affinity: set[int] | None = None,
    environ: Mapping[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
) -> int:
    """CPUs this process may use: min(affinity mask, SLURM_CPUS_PER_TASK, cgroup quota), >= 1.

    affinity: the CPU ids (default: os.sched_getaffinity(0), or os.cpu_count() where absent).
    A quota of 1.5 CPUs counts as 2 (a thread can use half a core's time usefully).
    """
    environ = os.environ if environ is None else environ
    if affinity is None:
        affinity = (
            os.sched_getaffinity(0)
            if hasattr(os, "sched_getaffinity")
            else set(range(os.cpu_count() or 1))
        )
    counts = [len(affinity) or 1]
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        counts.append(max(1, math.ceil(quota)))
    return max(1, min(counts))


def threads_per_worker(cpus: int, jobs: int, override: int = 0) -> int:
    """Torch threads for each of `jobs` workers sharing `cpus` CPUs; `override` > 0 wins."""
    return override if override > 0 else max(1, cpus // max(1, jobs))


def set_torch_threads(threads: int, automatic: bool = False) -> None:
    """Set torch's intra-op threads and, while torch still allows it, its inter-op threads.

    automatic: this is the process's automatic count (a pool worker's share), which a later run
    with PERF.THREADS 0 returns to after a run that overrode it.
    """
    global _CONFIGURED, _AUTOMATIC
    import torch

    torch.set_num_threads(threads)
    # inter-op threads can be set only before the first parallel region; later calls raise and
    # the pool keeps its size (a worker sets them first, before any work, so there they take)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    _CONFIGURED = threads
    if automatic:
        _AUTOMATIC = threads


def configure_run_threads(override: int) -> int:
    """Threads for a run in this process: PERF.THREADS when > 0; else the automatic count (a
    pool worker's share, or all usable CPUs for one process). Returns the count in force."""
    if override < 0:
        raise ValueError(f"PERF.THREADS must be 0 (automatic) or a positive count, got {override}")
    threads = override or _AUTOMATIC or threads_per_worker(available_cpus(), 1)
    set_torch_threads(threads, automatic=not override and _AUTOMATIC is None)
    return threads
