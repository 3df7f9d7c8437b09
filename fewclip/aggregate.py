"""Aggregation of a results tree: mean ± std, 95% CI and number of seeds per cell group.

Reads `results.json` files only (never logs). Groups by (dataset, trainer, recipe, shots, eval set),
where the eval set is the in-domain test split, a target center or a cross-dataset target. Cells
the sweep expected (its `sweep.json` manifest) but that have no results are listed as missing;
failed ones with their error.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

DEFAULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
PRIMARY_METRIC = "balanced_accuracy"  # marks the worst center; the y axis of the figures
GROUP_COLUMNS = ("dataset", "trainer", "recipe", "shots", "eval_set")
STATISTICS = ("mean", "std", "ci95", "n")


def collect_results(root: str | Path) -> list[dict[str, Any]]:
    """Every results.json under `root`; an unparseable one is kept with status "unreadable"."""
    records = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            data = {"status": "unreadable"}
        data["_path"] = str(path)
        records.append(data)
    return records


def find_missing(root: str | Path) -> list[str]:
    """Run folders listed in `<root>/sweep.json` that hold no results.json."""
    manifest = Path(root) / "sweep.json"
    if not manifest.is_file():
        return []
    run_dirs = json.loads(manifest.read_text()).get("run_dirs", [])
    return [d for d in run_dirs if not (Path(root) / d / "results.json").is_file()]


def summarise_values(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof 1), 95% t-interval half-width and count; None where undefined."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(np.mean(values))
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": None, "n": 1}
    from scipy import stats  # here, not at the top: `fewclip --help` imports this module

    std = float(np.std(values, ddof=1))
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "ci95": ci, "n": n}


def metric_value(values: dict[str, Any], metric: str) -> float | None:
    """A metric from one eval set; "binary_<name>" reads the binary view (e.g. binary_auroc)."""
    if metric.startswith("binary_"):
        value = (values.get("binary") or {}).get(metric[len("binary_") :])
    else:
        value = values.get(metric)
    return None if value is None else float(value)


def eval_sets(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """ "in-domain" (the test split), "target:<center>" for every target center and
    "cross:<dataset>" for the cross-dataset evaluation (EVAL.CROSS_DATASET)."""
    sets = {}
    if "test" in metrics:
        sets["in-domain"] = metrics["test"]
    for center, values in metrics.get("targets", {}).items():
        sets[f"target:{center}"] = values
    cross = metrics.get("cross_dataset")
    if isinstance(cross, dict):
        sets[f"cross:{cross.get('dataset', 'dataset')}"] = cross
    return sets


def cell_key(record: dict[str, Any]) -> tuple:
    """(dataset display name, trainer, recipe, shots) of a complete record."""
    cfg = record["config"]
    return (
        cfg["DATASET"].get("DISPLAY_NAME") or cfg["DATASET"]["NAME"],
        cfg["TRAINER"]["NAME"],
        cfg["RECIPE"],
        cfg["DATASET"]["NUM_SHOTS"],
    )


def seed_key(record: dict[str, Any]) -> tuple[int, int]:
    """(training seed, split seed): what pairs two runs of different methods."""
    cfg = record["config"]
    return (cfg["SEED"], cfg["DATASET"].get("SPLIT_SEED", cfg["SEED"]))


def iter_values(records: list[dict[str, Any]], metric: str) -> Iterator[tuple[tuple, tuple, float]]:
    """(group key, seed key, value) for every complete record and eval set holding `metric`."""
    for record in records:
        if record.get("status") != "complete":
            continue
        for eval_set, values in eval_sets(record.get("metrics", {})).items():
            value = metric_value(values, metric)
            if value is not None:
                yield (*cell_key(record), eval_set), seed_key(record), value


def _is_well_formed(record: dict[str, Any]) -> bool:
    try:
        cell_key(record)
        seed_key(record)
    except (KeyError, TypeError):
        return False
    return isinstance(record.get("metrics", {}), dict)


def aggregate(
    records: list[dict[str, Any]],
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    missing: list[str] | None = None,
) -> dict:
    """-> {"rows", "failed", "incomplete", "missing"}: one row per group, sorted."""
    failed, incomplete, complete = [], [], []
    for record in records:
        status = record.get("status")
        if status == "complete" and _is_well_formed(record):
            complete.append(record)
            continue
        entry = {"path": record["_path"], "status": status, "error": record.get("error")}
        if status == "complete":
            entry.update(status="malformed", error="results.json lacks config or metrics keys")
        (failed if status in ("failed", "diverged") else incomplete).append(entry)
    runs: dict[tuple, set] = defaultdict(set)
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in complete:
        for eval_set in eval_sets(record.get("metrics", {})):
            runs[(*cell_key(record), eval_set)].add(record["_path"])
    for metric in metrics:
        for key, _, value in iter_values(complete, metric):
            values[key][metric].append(value)
    rows = []
    for key in sorted(runs, key=lambda k: (*(str(part) for part in k[:3]), k[3], k[4])):
        row = dict(zip(GROUP_COLUMNS, key))
        row["seeds"] = len(runs[key])
        for metric in metrics:
            row[metric] = summarise_values(values[key].get(metric, []))
        rows.append(row)
    primary = PRIMARY_METRIC if PRIMARY_METRIC in metrics else metrics[0]
    mark_worst_centers(rows, primary)
    return {"rows": rows, "failed": failed, "incomplete": incomplete, "missing": missing or []}


def mark_worst_centers(rows: list[dict[str, Any]], metric: str) -> None:
    """Flag, per (dataset, trainer, recipe, shots), the target center(s) with the lowest mean;
    none when every center has the same mean."""
    by_cell = defaultdict(list)
    for row in rows:
        row["worst"] = False
        if row["eval_set"].startswith("target:") and row[metric]["mean"] is not None:
            by_cell[tuple(row[c] for c in GROUP_COLUMNS[:4])].append(row)
    for members in by_cell.values():
        means = [row[metric]["mean"] for row in members]
        if len(set(means)) > 1:
            for row in members:
                row["worst"] = row[metric]["mean"] == min(means)


FEW_SEEDS = 3  # a 95% CI from fewer seeds is flagged: with 2, t(0.975, 1) = 12.7 x std / sqrt 2


def format_cell(summary: dict[str, Any], scale: float = 100.0) -> str:
    """`mean ± std (CI ±half-width)`; one seed has no std or CI (`n/a`), a CI from fewer than
    FEW_SEEDS seeds is flagged with `*`."""
    if summary["mean"] is None:
        return "-"
    mean = f"{summary['mean'] * scale:.1f}"
    if summary["n"] < 2 or summary["ci95"] is None:
        return f"{mean} ± n/a (CI n/a)"
    flag = "*" if summary["n"] < FEW_SEEDS else ""
    return f"{mean} ± {summary['std'] * scale:.1f} (CI ±{summary['ci95'] * scale:.1f}{flag})"


def render_tables(result: dict, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, str]:
    """Terminal (tabulate 'simple'), Markdown ('github', with and without the notes on failed
    and missing cells) and CSV renderings of the rows."""
    headers = [*GROUP_COLUMNS, "seeds", *metrics]
    table = []
    for row in result["rows"]:
        eval_set = row["eval_set"] + (" (worst)" if row["worst"] else "")
        cells = [format_cell(row[m]) for m in metrics]
        table.append([*(row[c] for c in GROUP_COLUMNS[:4]), eval_set, row["seeds"], *cells])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [*GROUP_COLUMNS, "seeds", "worst", *(f"{m}_{s}" for m in metrics for s in STATISTICS)]
    )
    for row in result["rows"]:
        statistics = [row[m][s] for m in metrics for s in STATISTICS]
        writer.writerow([*(row[c] for c in GROUP_COLUMNS), row["seeds"], row["worst"], *statistics])
    notes = [f"- failed: {item['path']} ({item['error']})" for item in result["failed"]]
    notes += [f"- incomplete: {item['path']} ({item['status']})" for item in result["incomplete"]]
    notes += [f"- missing: {path}" for path in result["missing"]]
    caption = (
        "Values are mean ± std over seeds (CI: half-width of the 95% t-interval), in percent; "
        f"* marks a CI from fewer than {FEW_SEEDS} seeds (too few to trust); n/a: one seed; "
        "(worst) marks the weakest center."
    )
    table_markdown = tabulate(table, headers=headers, tablefmt="github") + "\n\n" + caption
    return {
        "terminal": "\n".join([tabulate(table, headers=headers, tablefmt="simple"), *notes]),
        "table_markdown": table_markdown + "\n",
        "markdown": table_markdown + ("\n\n" + "\n".join(notes) if notes else "") + "\n",
        "csv": buffer.getvalue(),
    }


def aggregate_folder(root: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict:
    """aggregate() over every results.json under `root`, with the manifest's missing cells."""
    return aggregate(collect_results(root), metrics, find_missing(root))


def write_summary(root: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, str]:
    """Aggregate `root` and write summary.md and summary.csv beside the run folders."""
    tables = render_tables(aggregate_folder(root, metrics), metrics)
    write_tables(root, tables)
    return tables


def write_tables(root: str | Path, tables: dict[str, str]) -> None:
    """Write `render_tables`' markdown and csv as summary.md and summary.csv in `root`."""
    from fewclip.files import write_atomic_bytes

    write_atomic_bytes(Path(root) / "summary.md", tables["markdown"].encode())
    write_atomic_bytes(Path(root) / "summary.csv", tables["csv"].encode())
