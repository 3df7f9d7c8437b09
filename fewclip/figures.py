"""Figures (PNG, matplotlib's Agg canvas; pyplot's global state is never touched).

Sweep figures read aggregated rows (fewclip.aggregate): metric vs shots with ±std bands per
method (bars when there is one shot count), and per-center bars. Run figures read one
results.json: the confusion matrix of every eval set and the in-domain reliability diagram.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # hollow, distinct: equal curves stay visible
DASHES = ("-", "--", "-.", ":")


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=DPI, bbox_inches="tight")
    temporary.replace(path)
    return path


def _method(row: dict[str, Any]) -> str:
    return f"{row['trainer']}/{row['recipe']}"


def _label(metric: str) -> str:
    return metric.replace("_", " ") + " (%)"


def plot_metric_vs_shots(rows: list[dict[str, Any]], metric: str, path: str | Path) -> Path:
    """One panel per eval set (in-domain, each target center); a line per method, mean ± std.

    rows: aggregated rows of one dataset (keys trainer, recipe, shots, eval_set, metric summary).
    """
    eval_sets = sorted({row["eval_set"] for row in rows}, key=lambda s: (s != "in-domain", s))
    columns = min(3, len(eval_sets))
    lines = -(-len(eval_sets) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.3 * lines))
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    all_shots = sorted({row["shots"] for row in rows})
    for ax, eval_set in zip(axes, eval_sets):
        series: dict[str, list[tuple]] = defaultdict(list)
        for row in rows:
            summary = row[metric]
            if row["eval_set"] == eval_set and summary["mean"] is not None:
                series[_method(row)].append((row["shots"], summary["mean"], summary["std"]))
        for index, (method, points) in enumerate(sorted(series.items())):
            shots, mean, std = (np.array(v, float) for v in zip(*sorted(points)))
            style = {"marker": MARKERS[index % len(MARKERS)], "linestyle": DASHES[index % 4]}
            style["markersize"] = 9 - 1.5 * (index % 4)  # nested rings where points coincide
            (line,) = ax.plot(shots, mean * 100, label=method, markerfacecolor="none", **style)
            ax.fill_between(
                shots, (mean - std) * 100, (mean + std) * 100, color=line.get_color(), alpha=0.2
            )
        if all_shots and min(all_shots) > 0:  # shot counts double: 1, 2, 4, ...
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_shots, [str(s) for s in all_shots])
        ax.set_title(eval_set)
        ax.set_xlabel("shots per class")
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
    for ax in axes[len(eval_sets) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels) or 1),
                  bbox_to_anchor=(0.5, 1.0), frameon=False)  # fmt: skip
    return _save(figure, path)


def plot_center_bars(rows: list[dict[str, Any]], metric: str, shots: int, path: str | Path) -> Path:
    """Grouped bars: eval sets on x, one bar per method at `shots`, error bar = std; the worst
    target center of each method is hatched."""
    rows = [row for row in rows if row["shots"] == shots and row[metric]["mean"] is not None]
    eval_sets = sorted({row["eval_set"] for row in rows}, key=lambda s: (s != "in-domain", s))
    methods = sorted({_method(row) for row in rows})
    figure = Figure(figsize=(max(5.0, 1.1 * len(eval_sets) * max(1, len(methods)) ** 0.5), 3.6))
    ax = figure.subplots()
    width = 0.8 / max(1, len(methods))
    for offset, method in enumerate(methods):
        by_set = {row["eval_set"]: row for row in rows if _method(row) == method}
        positions = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(eval_sets))]
        means = [by_set[s][metric]["mean"] * 100 if s in by_set else 0.0 for s in eval_sets]
        stds = [by_set[s][metric]["std"] * 100 if s in by_set else 0.0 for s in eval_sets]
        bars = ax.bar(positions, means, width, yerr=stds, capsize=2, label=method)
        for bar, eval_set in zip(bars, eval_sets):
            if by_set.get(eval_set, {}).get("worst"):
                bar.set_hatch("//")
    ax.set_xticks(range(len(eval_sets)), eval_sets, rotation=20, ha="right")
    ax.set_ylabel(_label(metric))
    hatched = any(row.get("worst") for row in rows)
    ax.set_title(f"{shots} shots per class" + (" (hatched: worst center)" if hatched else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_confusion_matrix(
    matrix: list[list[int]], class_names: list[str], path: str | Path, title: str = ""
) -> Path:
    """Counts (C, C), rows = true class, columns = predicted; cells coloured by row share."""
    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.55 * len(class_names)
    figure = Figure(figsize=(size + 1.0, size))
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        colour = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, f"{int(count)}", ha="center", va="center", color=colour, fontsize=8)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return _save(figure, path)


def plot_reliability(reliability: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Accuracy per confidence bin against the diagonal, and the number of samples per bin.

    reliability: {"bin_confidence", "bin_accuracy", "bin_count"} lists of equal length (bins).
    """
    accuracy = np.array([np.nan if v is None else v for v in reliability["bin_accuracy"]], float)
    counts = np.asarray(reliability["bin_count"], dtype=float)
    bins = len(counts)
    centers = (np.arange(bins) + 0.5) / bins
    figure = Figure(figsize=(4.2, 4.6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    top.bar(centers[filled], accuracy[filled], 1 / bins, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title, fontsize="medium")
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(centers, counts, 1 / bins, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("samples")
    return _save(figure, path)


def plot_attention(image: np.ndarray, attention: np.ndarray, title: str, path: str | Path) -> Path:
    """A readable attention figure: the image (H, W, 3 uint8) beside it with the map (rows,
    columns) upsampled bilinearly over it, a colour bar, and `title` (class and prediction)."""
    from PIL import Image

    height, width = image.shape[:2]
    grid = Image.fromarray(np.asarray(attention, dtype=np.float32), mode="F")
    heat = np.asarray(grid.resize((width, height), Image.Resampling.BILINEAR))
    figure = Figure(figsize=(7.0, 3.9))
    left, right = figure.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title("image", fontsize="medium")
    right.imshow(image, interpolation="nearest")
    overlay = right.imshow(heat, cmap="jet", alpha=0.5, interpolation="nearest")
    right.set_title("text-to-vision attention", fontsize="medium")
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(overlay, ax=right, fraction=0.046, label="attention weight")
    figure.suptitle(title, fontsize="medium")
    return _save(figure, path)


def confusion_figure_name(eval_set: str) -> str:
    """confusion_matrix.png for the in-domain test, confusion_matrix_<eval set>.png otherwise."""
    if eval_set == "in-domain":
        return "confusion_matrix.png"
    return "confusion_matrix_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", eval_set) + ".png"


def write_run_figures(results: dict[str, Any], run_dir: str | Path) -> list[Path]:
    """The run's confusion matrix of every eval set (in-domain test, each target center, the
    cross-dataset target in its own classes) and the in-domain reliability diagram.

    Skipped when all are newer than the run's results.json.
    """
    from fewclip.aggregate import eval_sets  # torch-free; here to keep figures' imports light

    run_dir = Path(run_dir)
    sets = {
        name: values
        for name, values in eval_sets(results.get("metrics") or {}).items()
        if values.get("confusion_matrix")
    }
    test = sets.get("in-domain")
    if results.get("status") != "complete" or not test:
        return []
    confusion = {name: run_dir / confusion_figure_name(name) for name in sets}
    paths = [*confusion.values(), run_dir / "reliability.png"]
    results_file = run_dir / "results.json"
    if results_file.exists() and all(
        p.exists() and p.stat().st_mtime >= results_file.stat().st_mtime for p in paths
    ):
        return paths
    own_classes = list(results.get("class_names") or [])
    cfg = results.get("config", {})
    method = f"{cfg.get('TRAINER', {}).get('NAME', '?')}/{cfg.get('RECIPE', '?')}"
    name = f"{method}, {cfg.get('DATASET', {}).get('NUM_SHOTS', '?')} shots"
    name += f", seed {cfg.get('SEED', '?')}"
    for eval_set, values in sets.items():
        matrix = values["confusion_matrix"]
        class_names = list(values.get("class_names") or own_classes)  # a cross target's own
        if len(class_names) != len(matrix):
            class_names = [str(index) for index in range(len(matrix))]
        title = "in-domain test" if eval_set == "in-domain" else eval_set
        plot_confusion_matrix(matrix, class_names, confusion[eval_set], f"{title}: {name}")
    ece = test.get("ece")
    suffix = f" (ECE {ece * 100:.1f}%)" if ece is not None else ""
    plot_reliability(test["reliability"], paths[-1], f"{name}{suffix}")
    return paths
