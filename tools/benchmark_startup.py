"""Start-up budget: what a user waits for before and around the model, as ratios to bare imports.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark_startup.py   # ~1 min on 2 idle cores
    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark_startup.py --repeats 5

Every measurement is a whole fresh process, and the repeats are interleaved (--help, --dry-run,
bare imports, one run, --help, ...) so a busy machine slows them alike; each row is the median.
Each run is also paired with the bare imports timed just before it.
The baseline is `python -c "import torch, open_clip"` (and `import torch` alone for `--help`).

- `--help` and `--dry-run` (the demo sweep's 18 cells): wall time.
- import-only RSS: peak memory (VmHWM) of a process that imports what a run imports before it
  builds a model (the CLI, the plugins, fewclip.run), against the bare imports' process.
- one tiny run (CLIP-LoRA, tiny-vit, 1 shot, synthetic data, a cold cache): wall time against
  bare imports + its own model compute (results.json train_seconds + evaluate_seconds).

- interpreter exit: from the bare imports' last statement, and from the run's last file
  (summary.md), to the process's end: `fewclip` freezes the collector before it exits
  (fewclip.cli.console), the bare process walks every object once more.
- the run's own work: its wall time less its exit, the bare imports' time to their last
  statement and its model compute: what fewclip adds whatever the exit costs.

Bytecode is cached as on a user's machine: PYTHONDONTWRITEBYTECODE is dropped (the warm-up run
writes fewclip's .pyc files; pip wrote the installed packages' at install).

Targets: `--help` < 1.5x `import torch`; the run <= 1.1x (bare imports + model compute).
`--neighbours` instead times the demo sweep idle and with one CPU-burning process per usable
CPU (target: <= 2.5x; ~5 min on 2 idle cores at --repeats 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS = "print(int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))))"
BARE = "import torch, open_clip"
BARE_TIMED = f"{BARE}; import time; print(time.time())"  # prints when its last statement ran
RUN_IMPORTS = (
    "import fewclip.cli; from fewclip.registry import load_installed_plugins; "
    "load_installed_plugins(); import fewclip.run"
)
TINY_RUN = [
    "--recipe", str(ROOT / "configs/trainers/clip_lora.yaml"),
    "--dataset-config", str(ROOT / "configs/datasets/synthetic.yaml"),
    "--shots", "1", "--seeds", "1",
    "MODEL.NAME", "tiny-vit", "OPTIM.LR", "5.0e-3", "OPTIM.ITERS_PER_SHOT", "10",
    "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
]  # fmt: skip


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one process (it must succeed) and its stdout."""
    seconds, stdout, _ = timed_to_end(command, env)
    return seconds, stdout


def timed_to_end(command: list[str], env: dict[str, str]) -> tuple[float, str, float]:
    """Wall seconds of one process (it must succeed), its stdout and the epoch time it ended."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    ended, seconds = time.time(), time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout, ended


def user_env() -> dict[str, str]:
    """This environment as a user's: offline, bytecode cached."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_once(work: Path, index: int, data_root: str, env: dict[str, str]) -> dict[str, float]:
    """One tiny run in fresh output and cache folders; its wall time and its model compute."""
    output, cache = work / f"out{index}", work / f"cache{index}"
    opts = ["OUTPUT_DIR", str(output), "CACHE_DIR", str(cache)]
    if data_root:
        opts += ["DATASET.ROOT", data_root]
    seconds, _, ended = timed_to_end([sys.executable, "run_shell.py", *TINY_RUN, *opts], env)
    (results,) = output.rglob("results.json")
    timings = json.loads(results.read_text())["timings"]
    compute = timings["train_seconds"] + timings["evaluate_seconds"]
    exit_seconds = ended - (output / "summary.md").stat().st_mtime  # its last file to its end
    return {
        "wall": seconds, "compute": compute, "decoding": timings.get("decoding_seconds", 0.0),
        "exit": exit_seconds,
    }  # fmt: skip


def bare_once(env: dict[str, str]) -> dict[str, float]:
    """`import torch, open_clip` in a fresh process: its wall time and its exit."""
    seconds, stdout, ended = timed_to_end([sys.executable, "-c", BARE_TIMED], env)
    exit_seconds = ended - float(stdout.split()[-1])
    return {"imports": seconds, "exit": exit_seconds}


def measure(repeats: int, work: Path) -> dict[str, list[float]]:
    env = user_env()
    python = sys.executable
    rows: dict[str, list[float]] = {}
    # a warm-up run generates the synthetic images once; later runs read them from DATASET.ROOT
    run_once(work, 0, "", env)
    (data_root,) = [str(path) for path in (work / "cache0" / "synthetic").iterdir()]
    for repeat in range(1, repeats + 1):
        for name, code in (("bare RSS", f"{BARE}; {RSS}"), ("run RSS", f"{RUN_IMPORTS}; {RSS}")):
            rows.setdefault(name, []).append(int(timed([python, "-c", code], env)[1]) / 1024)
        steps = {
            "import torch": [python, "-c", "import torch"],
            "--help": [python, "run_shell.py", "--help"],
            "--dry-run": [python, "run_shell.py", "--dry-run", "OUTPUT_DIR", str(work / "dry")],
        }
        for name, command in steps.items():
            rows.setdefault(name, []).append(timed(command, env)[0])
        for name, value in bare_once(env).items():  # right before the run it is paired with
            rows.setdefault(f"bare {name}", []).append(value)
        for name, value in run_once(work, repeat, data_root, env).items():
            rows.setdefault(f"run {name}", []).append(value)
    return rows


def report(rows: dict[str, list[float]], repeats: int) -> str:
    median = {name: statistics.median(values) for name, values in rows.items()}
    torch_alone, bare = median["import torch"], median["bare imports"]
    budget = bare + median["run compute"]
    # each repeat's run against the bare imports timed next to it: drift on a busy machine
    # cancels within a pair, so the median of these ratios is steadier than a ratio of medians
    pairs = [
        wall / (imports + compute)
        for wall, imports, compute in zip(
            rows["run wall"], rows["bare imports"], rows["run compute"]
        )
    ]
    paired = statistics.median(pairs)
    owns = [  # the run's work beyond the bare imports (to their last statement)
        (wall - run_exit) - (imports - bare_exit) - compute
        for wall, run_exit, imports, bare_exit, compute in zip(
            rows["run wall"], rows["run exit"], rows["bare imports"], rows["bare exit"],
            rows["run compute"],
        )
    ]  # fmt: skip
    own = statistics.median(owns)
    help_s, rss, bare_rss = median["--help"], median["run RSS"], median["bare RSS"]
    lines = [
        f"medians of {repeats} interleaved repeats; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        f"import torch                 {torch_alone:6.2f} s",
        f"import torch, open_clip      {bare:6.2f} s",
        f"fewclip --help               {help_s:6.2f} s  {help_s / torch_alone:.2f}x import torch"
        f" (target < 1.5x); {help_s / bare:.2f}x bare imports",
        f"fewclip --dry-run (18 cells) {median['--dry-run']:6.2f} s  "
        f"{median['--dry-run'] / bare:.2f}x bare imports",
        f"import-only RSS              {rss:6.0f} MB {rss / bare_rss:.2f}x bare imports"
        f" ({bare_rss:.0f} MB)",
        f"one tiny run                 {median['run wall']:6.2f} s  "
        f"{median['run wall'] / budget:.2f}x (bare imports + its model compute "
        f"{median['run compute']:.2f} s = {budget:.2f} s); median of paired ratios "
        f"{paired:.2f}x (target <= 1.1x); decoding {median['run decoding']:.2f} s",
        f"interpreter exit             bare imports {median['bare exit']:.2f} s, "
        f"one run {median['run exit']:.2f} s (frozen collector)",
        f"the run's own work           {own:.2f} s beyond the bare imports (less their exit) and "
        f"its model compute: {own / (bare - median['bare exit'] + median['run compute']):.2f}x"
        " of them",
        "  paired ratios, in run order: " + " ".join(f"{ratio:.2f}x" for ratio in pairs),
        "  bare imports, in run order:  " + " ".join(f"{t:.2f}" for t in rows["bare imports"]),
        "  one run, in run order:       " + " ".join(f"{t:.2f}" for t in rows["run wall"]),
        "  its own work, in run order:  " + " ".join(f"{t:.2f}" for t in owns),
    ]
    return "\n".join(lines)


def burn() -> None:
    """A CPU-burning neighbour: spin until killed."""
    while True:
        pass


def measure_neighbours(repeats: int, work: Path) -> str:
    """The demo sweep (`python run_shell.py`, 18 cells) idle vs with one CPU-burning neighbour
    per usable CPU, interleaved; the ratio of the medians (target <= 2.5x)."""
    from fewclip.threads import available_cpus

    env = user_env()
    cpus = available_cpus()
    times: dict[str, list[float]] = {"idle": [], "loaded": []}
    for repeat in range(repeats + 1):  # repeat 0 warms the cache (images, split files)
        for state in ("idle", "loaded"):
            command = [sys.executable, "run_shell.py", "CACHE_DIR", str(work / "demo-cache")]
            command += ["OUTPUT_DIR", str(work / f"demo-{state}-{repeat}")]
            burners = [
                subprocess.Popen([sys.executable, __file__, "--burn"])
                for _ in range(cpus if state == "loaded" else 0)
            ]
            try:
                seconds, _ = timed(command, env)
            finally:
                for burner in burners:
                    burner.kill()
                    burner.wait()
            if repeat:
                times[state].append(seconds)
            if not repeat:
                break
    idle, loaded = (statistics.median(times[state]) for state in ("idle", "loaded"))
    return (
        f"demo sweep (18 cells), {cpus} usable CPUs, medians of {repeats}: idle {idle:.1f} s, "
        f"with {cpus} busy neighbours {loaded:.1f} s: {loaded / idle:.2f}x (target <= 2.5x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--work", default="", help="folder for runs (default: a temporary one)")
    parser.add_argument("--neighbours", action="store_true", help="only: the demo idle vs busy")
    parser.add_argument("--burn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.burn:
        burn()
    with tempfile.TemporaryDirectory(prefix="fewclip-startup-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        if args.neighbours:
            print(measure_neighbours(args.repeats, work))
        else:
            print(report(measure(args.repeats, work), args.repeats))


if __name__ == "__main__":
    main()
