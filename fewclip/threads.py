"""How many torch threads a process should run: the CPUs it may really use, shared by its workers.

`os.cpu_count()` counts the machine's cores, not this process's share: under `taskset`, a SLURM
allocation or a container CPU quota it over-counts, and torch's default (one thread per core)
then oversubscribes the cores. A tiny training step went from 0.12 s to 1-5 s on a 2-core
machine at load 5-13. The usable count is the smallest of the affinity mask,
`SLURM_CPUS_PER_TASK` and the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), and
`--jobs` workers divide it. `PERF.THREADS` (0 = this automatic count) overrides it per run.

The count never follows the machine's load: gradients differ in their last bits between 1 and
2 threads (ViT-B/16), so a load-dependent count would change a rerun's digits. What does
follow the load is how idle OpenMP threads wait, which changes no result: they spin for the
next parallel region by default, and when a neighbour holds the same cores a spinning thread
burns the time slice its partner needs (a tiny training cell took 5x to 22x longer with one
busy neighbour per core; 2x with passive waiting, which costs about 1.25x on idle cores).
`choose_wait_policy` samples how busy this process's CPUs are, before torch loads OpenMP.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
WAIT_POLICY = "OMP_WAIT_POLICY"
BUSY_NEIGHBOURS = 0.5  # CPUs' worth of other processes' work on our CPUs that makes waits passive
SAMPLE_SECONDS = 0.05  # 5 ticks of each CPU at 100 Hz: enough to tell a busy core from an idle one
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


def read_cpu_ticks(cpus: set[int], stat: Path = PROC_STAT) -> tuple[int, int] | None:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat; None if unread.

    Idle time is the idle and iowait columns; busy is every other column but guest time (which
    the user column already holds).
    """
    busy = total = 0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *columns = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(value) for value in columns[:8]]  # user nice system idle iowait irq soft steal
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    return (busy, total) if total else None


def busy_neighbours(
    before: tuple[int, int], after: tuple[int, int], own_seconds: float, cpus: int, tick: float
) -> float:
    """CPUs' worth of other processes' work on our CPUs between two `read_cpu_ticks` samples:
    the busy share of the elapsed ticks times `cpus`, less this process's own CPU time."""
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return 0.0
    busy_share = (after[0] - before[0]) / elapsed
    wall = elapsed * tick / cpus
    return max(0.0, busy_share * cpus - own_seconds / wall) if wall > 0 else 0.0


def choose_wait_policy(
    environ: dict[str, str] | None = None,
    stat: Path = PROC_STAT,
    seconds: float = SAMPLE_SECONDS,
) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` (default os.environ) when other processes keep
    at least half a CPU of this process's CPUs busy; call it before torch is imported.

    A policy the user set is kept. Returns the policy set, or None when nothing was set (idle
    CPUs, a user's own choice, or no /proc/stat). Changes speed only, never a result.
    """
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    before, own_before = read_cpu_ticks(cpus, stat), time.process_time()
    if before is None:
        return None
    time.sleep(seconds)
    after, own = read_cpu_ticks(cpus, stat), time.process_time() - own_before
    if after is None:
        return None
    busy = busy_neighbours(before, after, own, len(cpus), 1.0 / os.sysconf("SC_CLK_TCK"))
    if busy < BUSY_NEIGHBOURS:
        return None
    environ[WAIT_POLICY] = "PASSIVE"
    logging.getLogger(__name__).info(
        "other processes keep %.1f of this process's %d CPUs busy: OpenMP threads wait "
        "passively (%s=PASSIVE; set %s yourself to choose)",
        busy,
        len(cpus),
        WAIT_POLICY,
        WAIT_POLICY,
    )
    return "PASSIVE"
