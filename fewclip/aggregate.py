"""Aggregation of a results tree: mean ± std, 95% CI and number of seeds per cell group.

Reads `results.json` files only (never logs). Groups by (dataset, trainer, recipe, shots, eval set),
where the eval set is the in-domain test split or a target center.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tabulate import tabulate

DEFAULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
GROUP_COLUMNS = ("dataset", "trainer", "recipe", "shots", "eval_set")


def collect_results(root: str | Path) -> list[dict[str, Any]]:
    """Every parseable results.json under `root` (unparseable ones count as incomplete)."""
    records = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {"status": "unreadable"}
        data["_path"] = str(path)
        records.append(data)
    return records


def summarise_values(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample std, 95% t-interval half-width and count; None where undefined."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return {"mean": mean, "std": std, "ci95": ci, "n": n}


def _eval_sets(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sets = {}
    if "test" in metrics:
        sets["in-domain"] = metrics["test"]
    for center, values in metrics.get("targets", {}).items():
        sets[f"target:{center}"] = values
    return sets


def aggregate(records: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict:
    """-> {"rows": [...], "failed": [...], "incomplete": [...]} with one row per group."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    failed, incomplete = [], []
    for record in records:
        status = record.get("status")
        if status != "complete":
            entry = {"path": record["_path"], "status": status, "error": record.get("error")}
            (failed if status in ("failed", "diverged") else incomplete).append(entry)
            continue
        cfg = record["config"]
        base = (
            cfg["DATASET"]["NAME"],
            cfg["TRAINER"]["NAME"],
            cfg["RECIPE"],
            cfg["DATASET"]["NUM_SHOTS"],
        )
        for eval_set, values in _eval_sets(record.get("metrics", {})).items():
            bucket = groups[(*base, eval_set)]
            bucket["_seeds"].append(cfg["SEED"])
            for metric in metrics:
                value = (
                    values.get(metric)
                    if metric != "binary_auroc"
                    else (values.get("binary") or {}).get("auroc")
                )
                if value is not None:
                    bucket[metric].append(float(value))
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(p) for p in k[:3]) + (k[3], k[4])):
        bucket = groups[key]
        row = dict(zip(GROUP_COLUMNS, key))
        row["seeds"] = len(bucket["_seeds"])
        for metric in metrics:
            row[metric] = summarise_values(bucket.get(metric, []))
        rows.append(row)
    _mark_worst_centers(rows, metrics[0])
    return {"rows": rows, "failed": failed, "incomplete": incomplete}


def _mark_worst_centers(rows: list[dict[str, Any]], metric: str) -> None:
    """Flag, per (dataset, trainer, recipe, shots), the target center with the lowest mean."""
    by_cell = defaultdict(list)
    for row in rows:
        row["worst"] = False
        if row["eval_set"].startswith("target:") and row[metric]["mean"] is not None:
            by_cell[tuple(row[c] for c in GROUP_COLUMNS[:4])].append(row)
    for members in by_cell.values():
        if len(members) > 1:
            min(members, key=lambda r: r[metric]["mean"])["worst"] = True


def format_cell(summary: dict[str, Any], scale: float = 100.0) -> str:
    if summary["mean"] is None:
        return "-"
    return f"{summary['mean'] * scale:.1f} ± {summary['std'] * scale:.1f}"


def render_tables(result: dict, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, str]:
    """Terminal (tabulate 'github'), Markdown and CSV renderings of the aggregated rows."""
    headers = [*GROUP_COLUMNS, "seeds", *metrics]
    table = []
    for row in result["rows"]:
        eval_set = row["eval_set"] + (" (worst)" if row["worst"] else "")
        table.append(
            [
                *(row[c] for c in GROUP_COLUMNS[:4]),
                eval_set,
                row["seeds"],
                *(format_cell(row[m]) for m in metrics),
            ]
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [*GROUP_COLUMNS, "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci95"))]
    )
    for row in result["rows"]:
        writer.writerow(
            [
                *(row[c] for c in GROUP_COLUMNS),
                row["seeds"],
                *(row[m][s] for m in metrics for s in ("mean", "std", "ci95")),
            ]
        )
    notes = [f"- failed: {item['path']} ({item['error']})" for item in result["failed"]]
    notes += [f"- incomplete: {item['path']} ({item['status']})" for item in result["incomplete"]]
    markdown = tabulate(table, headers=headers, tablefmt="github")
    caption = "Values are mean ± std over seeds, in percent."
    return {
        "terminal": tabulate(table, headers=headers, tablefmt="simple"),
        "markdown": "\n".join([markdown, "", caption, *notes]) + "\n",
        "csv": buffer.getvalue(),
    }


def write_summary(root: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, str]:
    """Aggregate `root` and write summary.md and summary.csv beside the run folders."""
    from fewclip.images import write_atomic_bytes

    result = aggregate(collect_results(root), metrics)
    tables = render_tables(result, metrics)
    root = Path(root)
    write_atomic_bytes(root / "summary.md", tables["markdown"].encode())
    write_atomic_bytes(root / "summary.csv", tables["csv"].encode())
    return tables
