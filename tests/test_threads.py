"""Torch thread sizing from the CPUs a process may use (fake affinity, environment and cgroups)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fewclip.threads import available_cpus, cgroup_cpu_limit, threads_per_worker

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
