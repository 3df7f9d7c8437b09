"""Torch thread sizing from the CPUs a process may use (fake affinity, environment and cgroups)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewclip.threads import (
    available_cpus,
    busy_neighbours,
    cgroup_cpu_limit,
    choose_wait_policy,
    threads_per_worker,
)

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_quota_and_unlimited(tmp_path):
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_available_cpus_is_the_smallest_limit(tmp_path):
    sixteen = set(range(16))
    assert available_cpus(sixteen, {}, tmp_path) == 16  # no quota file: the mask alone
    assert available_cpus({0, 3}, {}, tmp_path) == 2  # taskset: the mask, not the machine
    assert available_cpus(sixteen, {"SLURM_CPUS_PER_TASK": "4"}, tmp_path) == 4
    assert available_cpus(sixteen, {"SLURM_CPUS_PER_TASK": ""}, tmp_path) == 16
    write(tmp_path / "cpu.max", "250000 100000\n")  # a container with 2.5 CPUs -> 3 threads
    assert available_cpus(sixteen, {"SLURM_CPUS_PER_TASK": "8"}, tmp_path) == 3
    write(tmp_path / "cpu.max", "10000 100000\n")  # a tenth of a core still gets one thread
    assert available_cpus(sixteen, {}, tmp_path) == 1


def test_threads_are_divided_among_workers_and_the_key_wins():
    assert threads_per_worker(8, 1) == 8
    assert threads_per_worker(8, 3) == 2
    assert threads_per_worker(2, 4) == 1  # never zero
    assert threads_per_worker(8, 3, override=5) == 5


def test_a_run_sets_torch_threads_from_the_key_and_a_negative_key_is_one_line():
    """In a fresh process (torch allows inter-op threads to be set once, before work)."""
    code = (
        "import torch\n"
        "from fewclip.threads import configure_run_threads\n"
        "assert configure_run_threads(3) == 3\n"
        "assert torch.get_num_threads() == 3 and torch.get_num_interop_threads() == 3\n"
        "try:\n"
        "    configure_run_threads(-1)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PERF.THREADS must be 0" in done.stdout


def fake_stat(cpus: set[int], busy: int, idle: int) -> str:
    """/proc/stat text: the aggregate line, then per CPU `busy` user ticks and `idle` idle ticks
    (half of it as iowait), plus a CPU outside the affinity that is always busy."""
    lines = ["cpu  9 9 9 9 9 9 9 9 0 0"]
    lines += [f"cpu{c} {busy} 0 0 {idle - idle // 2} {idle // 2} 0 0 0 0 0" for c in sorted(cpus)]
    lines += [f"cpu{max(cpus) + 1} {busy + 10**6} 0 0 0 0 0 0 0 0 0", "ctxt 123", "btime 1"]
    return "\n".join(lines) + "\n"


def test_busy_neighbours_counts_other_processes_cpus():
    # 2 CPUs, 200 ticks of 10 ms elapsed (1 s of wall time), all of them busy: 2 CPUs' worth,
    # of which this process used 1.5 s -> 0.5 CPU of neighbours
    assert busy_neighbours((0, 0), (200, 200), 1.5, 2, 0.01) == pytest.approx(0.5)
    assert busy_neighbours((0, 0), (50, 200), 0.0, 2, 0.01) == pytest.approx(0.5)
    assert busy_neighbours((0, 0), (50, 200), 2.0, 2, 0.01) == 0.0  # never negative
    assert busy_neighbours((5, 10), (5, 10), 0.0, 2, 0.01) == 0.0  # no time elapsed


@pytest.mark.parametrize(("busy", "expected"), [(90, "PASSIVE"), (5, None)])
def test_wait_policy_turns_passive_only_on_busy_cpus(tmp_path, monkeypatch, busy, expected):
    """The CPUs of this process's affinity are sampled twice; a CPU outside it is ignored."""
    cpus = os.sched_getaffinity(0)
    stat = write(tmp_path / "stat", fake_stat(cpus, 10, 10))
    after = fake_stat(cpus, 10 + busy, 10 + 100 - busy)  # 100 ticks of each CPU elapsed
    monkeypatch.setattr(time, "sleep", lambda seconds: stat.write_text(after))
    environ: dict[str, str] = {}
    assert choose_wait_policy(environ, stat) == expected
    assert environ == ({"OMP_WAIT_POLICY": "PASSIVE"} if expected else {})


def test_wait_policy_keeps_the_users_choice_and_survives_no_proc_stat(tmp_path):
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(environ, tmp_path / "stat") is None
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    environ = {}
    assert choose_wait_policy(environ, tmp_path / "no-such-stat") is None and environ == {}
