"""Sweeps: expand a grid of cells (datasets x recipes x shots x seeds x extra keys) and run them.

The same expansion serves a sweep YAML file and CLI lists; a single run is a sweep of one cell.
Cells run in this process (`jobs=1`) or in worker processes that keep the backbone loaded.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from fewclip.config import ConfigError, build_config

LOGGER = logging.getLogger(__name__)
SWEEP_KEYS = {"output_dir", "datasets", "recipes", "shots", "seeds", "grid", "opts"}


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
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown keys {unknown} in sweep file {path}; allowed: {sorted(SWEEP_KEYS)}"
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


def _variant_name(assignment: dict[str, Any]) -> str:
    return "-".join(f"{key.split('.')[-1].lower()}{value}" for key, value in assignment.items())


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
    grid = dict(grid or {})
    grid_keys = list(grid)
    cells = []
    for dataset, recipe in itertools.product(datasets or [""], recipes or [""]):
        recipe_name = Path(recipe).stem if recipe else "default"
        for values in itertools.product(*(grid[key] for key in grid_keys)):
            assignment = dict(zip(grid_keys, values))
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


def build_cell_config(cell: Cell, extra_opts: Sequence[str] = ()):
    return build_config(cell.recipe or None, cell.dataset_config or None, [*cell.opts, *extra_opts])


def _run_cell(cell: Cell, extra_opts: tuple[str, ...]) -> dict[str, Any]:
    from fewclip.run import execute_run

    try:
        cfg = build_cell_config(cell, extra_opts)
    except Exception as error:  # a bad cell config is that cell's failure, reported in one line
        return {"status": "failed", "error": f"{type(error).__name__}: {error}", "run_dir": None}
    return execute_run(cfg)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_cells(cells: Sequence[Cell], extra_opts: Sequence[str] = (), jobs: int = 1) -> list[dict]:
    """Run every cell; failures are recorded and the rest go on. Returns results in cell order."""
    extra = tuple(extra_opts)
    results: list[dict | None] = [None] * len(cells)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", dynamic_ncols=True)

    def record(index: int, result: dict) -> None:
        results[index] = result
        status = result.get("status")
        key = "skipped" if result.get("skipped") else "done" if status == "complete" else "failed"
        counts[key] += 1
        if key == "failed":
            tqdm.write(f"FAILED {cells[index].describe()}: {result.get('error', status)}")
        bar.set_postfix(counts, refresh=False)
        bar.update(1)

    if jobs <= 1:
        for index, cell in enumerate(cells):
            record(index, _run_cell(cell, extra))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(_run_cell, cell, extra): i for i, cell in enumerate(cells)}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as error:  # a worker died: the cell is failed, not the sweep
                    result = {"status": "failed", "error": f"worker died: {error}"}
                record(futures[future], result)
    bar.close()
    return [r for r in results if r is not None]
