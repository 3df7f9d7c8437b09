"""The sweep report: `report.md` in the sweep folder with the tables and figures embedded.

Written from results.json files only (via fewclip.aggregate): status counts, per dataset the
metric-vs-shots figure and the per-center bars, the summary table, example confusion matrices and
reliability diagrams (every complete run gets its own in its folder), failed and missing cells,
and optionally a paired comparison with a second sweep.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from fewclip.aggregate import (
    DEFAULT_METRICS,
    PRIMARY_METRIC,
    collect_results,
    find_missing,
    render_tables,
    write_tables,
)
from fewclip.aggregate import aggregate as aggregate_records
from fewclip.compare import compare_records, render_comparison
from fewclip.figures import plot_center_bars, plot_metric_vs_shots, write_run_figures
from fewclip.files import write_atomic_bytes

REPORT_FILE = "report.md"


def _relative(path: str | Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _dataset_figures(rows: list[dict], metric: str, root: Path) -> list[str]:
    """Figures of each dataset, as Markdown lines (headings and embedded images)."""
    lines = []
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"]].append(row)
    for dataset, members in sorted(by_dataset.items()):
        lines += [f"### {dataset}", ""]
        shot_counts = {row["shots"] for row in members}
        if len(shot_counts) > 1:  # one shot count would be a column of dots: bars instead
            curve = plot_metric_vs_shots(
                members, metric, root / "figures" / f"{_safe(dataset)}_{metric}_vs_shots.png"
            )
            lines += [f"![{metric} vs shots, {dataset}]({_relative(curve, root)})", ""]
        if len(shot_counts) == 1 or len({row["eval_set"] for row in members}) > 1:
            shots = max(shot_counts)
            bars = plot_center_bars(
                members, metric, shots, root / "figures" / f"{_safe(dataset)}_centers.png"
            )
            lines += [f"![{metric} per eval set, {dataset}]({_relative(bars, root)})", ""]
    return lines


def _run_figures(records: list[dict[str, Any]], root: Path) -> list[str]:
    """Write every complete run's figures; embed those of the first seed at the largest shots."""
    complete = [r for r in records if r.get("status") == "complete" and "config" in r]
    examples: dict[tuple, tuple] = {}
    for record in complete:
        run_dir = Path(record["_path"]).parent
        paths = write_run_figures(record, run_dir)
        if not paths:
            continue
        cfg = record["config"]
        dataset = cfg["DATASET"].get("DISPLAY_NAME") or cfg["DATASET"]["NAME"]
        method = (dataset, cfg["TRAINER"]["NAME"], cfg["RECIPE"])
        rank = (-cfg["DATASET"]["NUM_SHOTS"], cfg["SEED"])
        if method not in examples or rank < examples[method][0]:
            examples[method] = (rank, paths, record)
    if not examples:
        return []
    lines = [
        "## Example runs",
        "",
        "Confusion matrices of every eval set (in-domain test, each target center, the"
        " cross-dataset target) and the in-domain reliability diagram of the first seed at the"
        " largest shot count; every run folder holds its own `confusion_matrix*.png` and"
        " `reliability.png`.",
        "",
    ]
    for (dataset, trainer, recipe), (_, paths, record) in sorted(examples.items()):
        cfg = record["config"]
        shots, seed = cfg["DATASET"]["NUM_SHOTS"], cfg["SEED"]
        lines += [f"**{dataset} · {trainer}/{recipe} · {shots} shots · seed {seed}**", ""]
        lines += [" ".join(f"![{p.stem}]({_relative(p, root)})" for p in paths), ""]
        run_dir = paths[0].parent
        names = (record.get("training") or {}).get("attention_maps") or []
        attention = [run_dir / name for name in names if (run_dir / name).is_file()]
        if attention:
            lines += ["Attention maps (true class, prediction):", ""]
            lines += [" ".join(f"![{p.stem}]({_relative(p, root)})" for p in attention), ""]
    return lines


def _problems(result: dict, root: Path) -> list[str]:
    lines = []
    if result["failed"]:
        lines += ["## Failed cells", "", "| run | error | traceback |", "|---|---|---|"]
        for item in result["failed"]:
            run_dir = Path(item["path"]).parent
            error = str(item.get("error") or item["status"]).splitlines()[0].replace("|", "\\|")
            trace = run_dir / "traceback.txt"
            link = f"[traceback]({_relative(trace, root)})" if trace.exists() else "-"
            lines.append(f"| {_relative(run_dir, root)} | {error} | {link} |")
        lines.append("")
    if result["incomplete"] or result["missing"]:
        lines += ["## Missing or incomplete cells", ""]
        lines += [f"- {path} (no results yet)" for path in result["missing"]]
        lines += [
            f"- {_relative(Path(item['path']).parent, root)} ({item['status']})"
            for item in result["incomplete"]
        ]
        lines.append("")
    return lines


def build_comparison(
    root: str | Path, other: str | Path, metric: str = PRIMARY_METRIC
) -> tuple[list[dict], str]:
    """Paired comparison of sweep `root` (A) against sweep `other` (B): rows and Markdown."""
    rows = compare_records(collect_results(root), collect_results(other), metric)
    return rows, render_comparison(rows, str(root), str(other))


def write_report(
    root: str | Path,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    primary: str = PRIMARY_METRIC,
    compare_with: str | Path | None = None,
) -> tuple[Path, str]:
    """Aggregate `root`; write summary.md/csv, the figures and report.md.

    Returns the path of report.md and the terminal rendering of the table (with the notes on
    failed and missing cells).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist")
    metrics = tuple(dict.fromkeys((primary, *metrics)))
    records = collect_results(root)
    result = aggregate_records(records, metrics, find_missing(root))
    tables = render_tables(result, metrics)
    write_tables(root, tables)
    statuses = [record.get("status") for record in records]
    counts = (
        f"{statuses.count('complete')} complete, "
        f"{len(result['failed'])} failed, {len(result['missing'])} missing, "
        f"{len(result['incomplete'])} incomplete"
    )
    lines = [f"# Sweep report: {root.name}", "", f"Runs: {counts}.", ""]
    if result["rows"]:
        lines += [f"## {primary.replace('_', ' ')} (mean ± std over seeds)", ""]
        lines += _dataset_figures(result["rows"], primary, root)
        lines += ["## Table", "", tables["table_markdown"].rstrip(), ""]
    lines += _run_figures(records, root)
    lines += _problems(result, root)
    if compare_with is not None:
        _, comparison = build_comparison(root, compare_with, primary)
        lines += [f"## Comparison with {compare_with}", "", comparison]
    path = root / REPORT_FILE
    write_atomic_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    return path, tables["terminal"]
