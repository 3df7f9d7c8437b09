"""Sweeps: expand a grid of cells (datasets x recipes x shots x seeds x extra keys) and run them.

The same expansion serves a sweep YAML file and CLI lists; a single run is a sweep of one cell.
Cells run in this process (`jobs=1`) or in spawned worker processes that keep the backbone loaded
across their cells. A worker that dies (SIGKILL, out of memory) fails only the cell it was running
(recorded in its folder, so `--retry-failed` finds it); the cells the broken pool interrupted run
again in a fresh pool. Finished cells are never lost: each wrote its results.json atomically.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm
from yacs.config import CfgNode

from fewclip.config import ConfigError, build_config
from fewclip.preflight import (
    check_datasets,
    check_output_root,
    check_previous_results,
    check_run_folders,
)
from fewclip.registry import loaded_plugins, restore_plugins
from fewclip.threads import (
    available_cpus,
    configure_run_threads,
    set_torch_threads,
    threads_per_worker,
)
from fewclip.workers import die_with_parent, stop_pool

LOGGER = logging.getLogger(__name__)
SWEEP_KEYS = {
    "output_dir", "datasets", "recipes", "shots", "seeds", "grid", "opts", "slurm",
    "leave_one_center_out",
}  # fmt: skip
MANIFEST_FILE = "sweep.json"
WORKER_DIED = "worker process died while running this cell (killed by a signal or out of memory)"


@dataclass(frozen=True)
class Cell:
    """One run: a dataset config file, a recipe file and `KEY VALUE` opts."""

    dataset_config: str
    recipe: str
    opts: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return " ".join([Path(self.recipe).stem or "-", *self.opts])


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML; unknown top-level keys are an error naming them and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"YAML syntax error in sweep file {path}{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must hold a mapping of keys")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown keys {unknown} in sweep file {path}; allowed: {sorted(SWEEP_KEYS)}"
        )
    if not isinstance(data.get("grid", {}), dict):
        raise ConfigError(f"grid in sweep file {path} must map config keys to lists of values")
    for key in ("datasets", "recipes", "opts"):
        if key in data and not isinstance(data[key], list):
            raise ConfigError(f"{key} in sweep file {path} must be a list, like [a, b]")
    for key in ("shots", "seeds"):
        values = data.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{key} in sweep file {path} must be a non-empty list of integers, like"
                f" {'[1, 4, 16]' if key == 'shots' else '[1, 2, 3]'} (got {values!r}); leave the"
                " key out for the config's own value"
            )
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad or (key == "shots" and 0 in values):
            raise ConfigError(
                f"{key} in sweep file {path}: {bad or [0]} are not"
                f" {'positive' if key == 'shots' else 'non-negative'} integers"
            )
    base = path.parent
    for key in ("datasets", "recipes"):
        data[key] = [str(_resolve(base, item)) for item in data.get(key, [])]
    return data


def _resolve(base: Path, item: str) -> Path | str:
    if not item:
        return ""
    candidate = Path(item)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return base / candidate if (base / candidate).exists() else candidate


def _render(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _variant_name(assignment: dict[str, Any]) -> str:
    """`{"OPTIM.LR": 0.001, "LORA.TARGETS": ["q", "v"]}` -> `lr0.001-targetsq+v` (path-safe)."""
    name = "-".join(f"{key.split('.')[-1].lower()}{_render(v)}" for key, v in assignment.items())
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", name)


def expand_cells(
    datasets: Sequence[str] = ("",),
    recipes: Sequence[str] = ("",),
    shots: Sequence[int] = (),
    seeds: Sequence[int] = (),
    grid: dict[str, Sequence[Any]] | None = None,
    opts: Sequence[str] = (),
) -> list[Cell]:
    """Cartesian product in a stable order; a seed sets both SEED and DATASET.SPLIT_SEED.

    Extra grid keys add a variant suffix to RECIPE so each variant gets its own run folder.
    """
    grid = {
        key: values if isinstance(values, list) else [values]
        for key, values in (grid or {}).items()
    }
    cells = []
    for dataset, recipe in itertools.product(datasets or [""], recipes or [""]):
        recipe_name = Path(recipe).stem if recipe else "default"
        for values in itertools.product(*grid.values()):
            assignment = dict(zip(grid, values))
            variant = []
            for key, value in assignment.items():
                rendered = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                variant += [key, rendered]
            if assignment:
                variant += ["RECIPE", f"{recipe_name}-{_variant_name(assignment)}"]
            for shot in shots or [None]:
                for seed in seeds or [None]:
                    cell_opts = list(opts) + variant
                    if shot is not None:
                        cell_opts += ["DATASET.NUM_SHOTS", str(shot)]
                    if seed is not None:
                        cell_opts += ["SEED", str(seed), "DATASET.SPLIT_SEED", str(seed)]
                    cells.append(Cell(str(dataset), str(recipe), tuple(cell_opts)))
    return cells


def build_cell_config(cell: Cell, extra_opts: Sequence[str] = ()) -> CfgNode:
    return build_config(cell.recipe or None, cell.dataset_config or None, [*cell.opts, *extra_opts])


@dataclass
class Sweep:
    """The expanded cells, their resolved configs, the sweep folder and launcher options."""

    cells: list[Cell]
    configs: list[CfgNode]
    root: Path
    slurm: dict[str, Any] = field(default_factory=dict)


def build_sweep(
    sweep_file: str | Path | None = None,
    datasets: Sequence[str] = (),
    recipes: Sequence[str] = (),
    shots: Sequence[int] = (),
    seeds: Sequence[int] = (),
    opts: Sequence[str] = (),
    leave_one_center_out: bool = False,
) -> Sweep:
    """Merge a sweep file with CLI lists (CLI wins) and resolve every cell's config up front, so
    a bad key in any cell fails before the first one runs. Leave-one-center-out (flag or the
    file's `leave_one_center_out: true`) turns each cell into one fold per center."""
    spec = load_sweep_file(sweep_file) if sweep_file else {}
    all_opts = [str(value) for value in [*spec.get("opts", []), *opts]]
    if spec.get("output_dir") and "OUTPUT_DIR" not in list(opts)[0::2]:
        all_opts += ["OUTPUT_DIR", str(spec["output_dir"])]
    cells = expand_cells(
        datasets=list(datasets) or spec.get("datasets", [""]),
        recipes=list(recipes) or spec.get("recipes", [""]),
        shots=list(shots) or spec.get("shots", []),
        seeds=list(seeds) or spec.get("seeds", []),
        grid=spec.get("grid"),
        opts=all_opts,
    )
    if leave_one_center_out or spec.get("leave_one_center_out"):
        cells = expand_center_folds(cells)
    configs = [build_cell_config(cell) for cell in cells]
    root = Path(configs[0].OUTPUT_DIR) if configs else Path("output")
    check_run_folders(cells, configs)
    check_output_root(root)
    check_previous_results(configs)
    check_datasets(cells, configs)
    return Sweep(cells, configs, root, dict(spec.get("slurm") or {}))


def _last_value(opts: Sequence[str], key: str) -> str | None:
    values = [value for name, value in zip(opts[0::2], opts[1::2]) if name == key]
    return values[-1] if values else None


def expand_center_folds(cells: Sequence[Cell]) -> list[Cell]:
    """Each cell -> one cell per center of its dataset, that center held out as the target and
    the others as sources; each fold gets its own RECIPE suffix (`-loco_<center>`)."""
    from fewclip.protocol import expand_leave_one_center_out, load_dataset_centers

    centers_of: dict[tuple, list[str]] = {}
    folds = []
    for cell in cells:
        data_opts = [
            value
            for name, value in zip(cell.opts[0::2], cell.opts[1::2])
            if name.startswith("DATASET.") or name in ("CACHE_DIR", "OUTPUT_DIR")
            for value in (name, value)
        ]
        key = (cell.dataset_config, tuple(data_opts))
        if key not in centers_of:
            cleared = [*data_opts, "DATASET.SOURCE_CENTERS", "[]", "DATASET.TARGET_CENTERS", "[]"]
            centers_of[key] = load_dataset_centers(cell.dataset_config or None, cleared)
        recipe = _last_value(cell.opts, "RECIPE") or (Path(cell.recipe).stem or "default")
        for fold in expand_leave_one_center_out(centers_of[key], recipe):
            folds.append(Cell(cell.dataset_config, cell.recipe, (*cell.opts, *fold)))
    return folds


def cell_statuses(configs: Sequence[CfgNode]) -> list[str]:
    """Per cell: "complete", "failed", "diverged", "running" ... or "todo" (no results yet)."""
    from fewclip.results import read_results
    from fewclip.run import resolve_run_dir

    return [(read_results(resolve_run_dir(cfg)) or {}).get("status", "todo") for cfg in configs]


def describe_cells(configs: Sequence[CfgNode], statuses: Sequence[str]) -> str:
    """The `--dry-run` listing: one line per cell (status, run folder) and a count."""
    from fewclip.run import resolve_run_dir

    lines = [f"{status:9s} {resolve_run_dir(cfg)}" for cfg, status in zip(configs, statuses)]
    counts = {status: list(statuses).count(status) for status in sorted(set(statuses))}
    lines.append(f"{len(configs)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def write_manifest(root: str | Path, configs: Sequence[CfgNode]) -> Path:
    """List every run folder the sweep expects (so aggregation can name the missing ones)."""
    from fewclip.files import write_atomic_bytes
    from fewclip.run import resolve_run_dir

    root = Path(root)
    run_dirs = [os.path.relpath(resolve_run_dir(cfg), root) for cfg in configs]
    path = root / MANIFEST_FILE
    write_atomic_bytes(path, (json.dumps({"run_dirs": run_dirs}, indent=1) + "\n").encode())
    return path


def run_cell(cell: Cell, extra_opts: Sequence[str] = (), decode_all: bool = True) -> dict[str, Any]:
    """Run one cell in this process; a config error is this cell's failure, not the sweep's.
    decode_all False: a one-off run decodes only the images it reads (see execute_run)."""
    from fewclip.run import execute_run

    try:
        cfg = build_cell_config(cell, extra_opts)
        configure_run_threads(int(cfg.PERF.THREADS))
    except Exception as error:  # a bad cell config is that cell's failure, reported in one line
        return {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": None}
    return execute_run(cfg, decode_all)


# Worker side: the folder where a worker marks the cell it starts (`<index>.started`) and, when
# the pool terminates it because another worker died, the cell it was running (`.terminated`).
_EVENTS: Path | None = None
_CURRENT: int | None = None


def _init_worker(
    threads: int, events: str, plugins: dict[str, list[str]], parent: int | None = None
) -> None:
    global _EVENTS
    if parent is not None:
        die_with_parent(parent)
    _EVENTS = Path(events)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the sweep process stops the workers
    restore_plugins(plugins)  # the datasets and trainers the parent registered
    set_torch_threads(threads, automatic=True)  # before any torch work: inter-op threads too
    signal.signal(signal.SIGTERM, _on_terminate)
    atexit.register(gc.freeze)  # a quick exit, as the command's (fewclip.cli.console)


def _on_terminate(signum: int, frame: Any) -> None:
    if _CURRENT is not None:  # a file, not a queue: no lock the interrupted code might hold
        (_EVENTS / f"{_CURRENT}.terminated").touch()
    os._exit(128 + signum)


def _run_cell_in_worker(index: int, cell: Cell, extra_opts: tuple[str, ...]) -> dict[str, Any]:
    global _CURRENT
    _CURRENT = index
    (_EVENTS / f"{index}.started").touch()
    try:
        return run_cell(cell, extra_opts)
    finally:
        _CURRENT = None


def record_worker_death(cell: Cell, extra_opts: Sequence[str] = ()) -> dict[str, Any]:
    """Write a failed results.json (and traceback.txt) for a cell whose worker was killed."""
    from fewclip.config import compute_config_hash, config_to_dict
    from fewclip.results import FAILED, write_results
    from fewclip.run import resolve_run_dir

    cfg = build_cell_config(cell, extra_opts)
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "traceback.txt").write_text(WORKER_DIED + "\n")
    result = {
        "status": FAILED,
        "error": WORKER_DIED,
        "config": config_to_dict(cfg),
        "config_hash": compute_config_hash(cfg),
        "run_dir": str(run_dir),
    }
    write_results(run_dir, result)
    return result


def _run_pool(
    cells: Sequence[Cell],
    extra: tuple[str, ...],
    jobs: int,
    record: Callable[[int, dict], None],
) -> None:
    """Run all cells in a pool of spawned workers, recording each result as it comes.

    When a worker dies the pool breaks: the cell it was running is recorded as failed (it started
    and was not terminated by the pool), the others are run again in a fresh pool.
    """
    context = multiprocessing.get_context("spawn")
    threads = threads_per_worker(available_cpus(), jobs)  # this process's CPUs, not the machine's
    indices = list(range(len(cells)))
    while indices:
        broken: list[int] = []
        with tempfile.TemporaryDirectory(prefix="fewclip-sweep-") as events:
            with ProcessPoolExecutor(
                min(jobs, len(indices)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(threads, events, loaded_plugins(), os.getpid()),
            ) as pool:
                try:
                    futures = {
                        pool.submit(_run_cell_in_worker, i, cells[i], extra): i for i in indices
                    }
                    for future in as_completed(futures):
                        index = futures[future]
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken.append(index)
                            continue
                        except Exception as error:  # the result could not come back
                            error_text = f"{type(error).__name__}: {error}"
                            result = {"status": "failed", "error": error_text}
                        record(index, result)
                except KeyboardInterrupt:  # Ctrl-C: no cell starts; the running ones stop now
                    stop_pool(pool)
                    raise
            marks = {path.name for path in Path(events).iterdir()}
        killed = [i for i in broken if f"{i}.started" in marks and f"{i}.terminated" not in marks]
        for index in killed:
            record(index, record_worker_death(cells[index], extra))
        if broken and not killed and len(broken) == len(indices):  # no progress: do not loop
            for index in broken:
                record(index, {"status": "failed", "error": "the worker pool broke at start"})
            return
        indices = [i for i in broken if i not in killed]


def run_cells(cells: Sequence[Cell], extra_opts: Sequence[str] = (), jobs: int = 1) -> list[dict]:
    """Run every cell; failures are recorded and the rest go on. Returns results in cell order.

    The progress bar shows cells done, skipped (already complete), failed, running and the ETA.
    """
    extra = tuple(extra_opts)
    results: list[dict | None] = [None] * len(cells)
    counts = {"done": 0, "skipped": 0, "failed": 0, "running": 0}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", dynamic_ncols=True)

    def record(index: int, result: dict) -> None:
        results[index] = result
        status = result.get("status")
        key = "skipped" if result.get("skipped") else "done" if status == "complete" else "failed"
        counts[key] += 1
        if key == "failed":
            tqdm.write(f"FAILED {cells[index].describe()}: {result.get('error', status)}")
        remaining = len(cells) - sum(r is not None for r in results)
        counts["running"] = min(max(1, jobs), remaining)
        bar.set_postfix(counts, refresh=False)
        bar.update(1)

    try:  # Ctrl-C (KeyboardInterrupt) goes to the caller once the workers have stopped
        if jobs <= 1:
            for index, cell in enumerate(cells):
                record(index, run_cell(cell, extra, decode_all=len(cells) > 1))
        else:
            _run_pool(cells, extra, jobs, record)
    finally:
        bar.close()
    return [r for r in results if r is not None]
