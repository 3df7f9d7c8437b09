"""Faults of a sweep's processes: workers die with the sweep, Ctrl-C stops it and summarises
what is complete, a cell finished while another process waited for its lock never runs twice.

The tests wait on files and process exits; the deadlines only turn a hang into a failure.
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

import fewclip.run as run_module
from fewclip.config import build_config
from fewclip.results import read_results
from fewclip.run import execute_run, resolve_run_dir

ROOT = Path(__file__).resolve().parent.parent
ZEROSHOT = str(ROOT / "configs" / "trainers" / "zeroshot.yaml")
SYNTHETIC = str(ROOT / "configs" / "datasets" / "synthetic.yaml")
# A zero-shot method whose cell writes `<OUTPUT_DIR>/pid_seed_<s>` and, while
# `<OUTPUT_DIR>/block_seed_<s>` exists, waits for `<OUTPUT_DIR>/release` (a running cell).
PLUGIN = """
import os, time
from pathlib import Path
from fewclip.registry import TRAINERS
from fewclip_trainers.zeroshot import ZeroShotCLIP

@TRAINERS.register()
class BlockingZeroShot(ZeroShotCLIP):
    def prepare(self, train):
        root = Path(self.cfg.OUTPUT_DIR)
        (root / f"pid_seed_{self.cfg.SEED}").write_text(str(os.getpid()))
        while (root / f"block_seed_{self.cfg.SEED}").exists() and not (root / "release").exists():
            time.sleep(0.05)
"""


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"hang guard: still waiting for {what}"
        time.sleep(0.05)


def exited(pid: int) -> bool:
    """True once `pid` has exited (gone, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def start_sweep(tmp_path: Path, cache: Path, seeds: list[int], blocked: list[int]):
    out = tmp_path / "out"
    out.mkdir()
    plugin = tmp_path / "blocking.py"
    plugin.write_text(PLUGIN)
    for seed in blocked:
        (out / f"block_seed_{seed}").touch()
    opts = [
        "OUTPUT_DIR", str(out), "CACHE_DIR", str(cache), "PLUGINS", str(plugin),
        "TRAINER.NAME", "BlockingZeroShot", "RECIPE", "blocking",
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12", "DATASET.NUM_SHOTS", "1",
    ]  # fmt: skip
    seeds_flag = ["--seeds", *map(str, seeds)]
    command = [sys.executable, "run_shell.py", "--dataset-config", SYNTHETIC, *seeds_flag]
    command += ["--recipe", ZEROSHOT, "--jobs", "2", *opts]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a test run started in the background inherits SIGINT ignored (POSIX, for background
        # jobs), and Python keeps it so: the sweep must see Ctrl-C as a user's terminal sends it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return process, out


def worker_pids(out: Path, seeds: list[int]) -> list[int]:
    files = [out / f"pid_seed_{seed}" for seed in seeds]
    wait_for(lambda: all(f.is_file() and f.read_text() for f in files), "the cells to start")
    return [int(f.read_text()) for f in files]


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_sweep_process(tmp_path, shared_cache, kill):
    process, out = start_sweep(tmp_path, shared_cache, [1, 2, 3], blocked=[1, 2, 3])
    pids = worker_pids(out, [1, 2])  # two workers, each inside a cell
    process.send_signal(kill)
    process.wait()
    for pid in pids:
        wait_for(lambda pid=pid: exited(pid), f"worker {pid} to exit")
    assert not (out / "pid_seed_3").exists()  # no worker went on to the next cell
    (out / "release").touch()


@pytest.mark.slow
def test_ctrl_c_stops_a_two_worker_sweep_and_summarises_what_is_complete(tmp_path, shared_cache):
    process, out = start_sweep(tmp_path, shared_cache, [1, 2, 3, 4], blocked=[2, 3, 4])
    pids = worker_pids(out, [1, 2])
    wait_for(lambda: list(out.rglob("results.json")), "the first cell to finish")
    pids.append(worker_pids(out, [3])[0])  # seed 1's worker took seed 3
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=HANG_GUARD)
    assert process.returncode == 130, output[-2000:]
    assert "interrupted" in output and "Traceback" not in output, output[-2000:]
    assert all(exited(pid) for pid in pids)  # the sweep waited for its workers
    results = [read_results(path.parent) for path in out.rglob("results.json")]
    assert [r["config"]["SEED"] for r in results if r["status"] == "complete"] == [1]
    assert not (out / "pid_seed_4").exists()  # no cell started after Ctrl-C
    assert (next(out.rglob("summary.md"))).is_file()
    (out / "release").touch()


def test_a_cell_finished_while_waiting_for_its_lock_is_not_run_again(fast_opts, monkeypatch):
    cfg = build_config(ZEROSHOT, SYNTHETIC, fast_opts)
    assert execute_run(cfg)["status"] == "complete"
    run_dir = resolve_run_dir(cfg)
    finished = (run_dir / "results.json").read_bytes()
    (run_dir / "results.json").unlink()  # as when the first check ran, before the other finished
    original = run_module.cell_lock

    def lock_after_the_other_process_finished(path: Path):
        (run_dir / "results.json").write_bytes(finished)  # the window, widened
        return original(path)

    monkeypatch.setattr(run_module, "cell_lock", lock_after_the_other_process_finished)
    monkeypatch.setattr(run_module, "_run_locked", lambda *args: pytest.fail("ran twice"))
    assert execute_run(cfg)["skipped"] is True
    assert (run_dir / "results.json").read_bytes() == finished
