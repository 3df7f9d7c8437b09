"""Comparing two sweeps (e.g. a method against a baseline): paired differences over matched seeds.

Two runs pair when they share dataset, shot count, eval set, training seed and split seed (so the
same few-shot images); every method (trainer/recipe) of sweep A is paired with every method of
sweep B. Each pairing reports the mean difference A - B with its std and 95% t-interval, a paired
t-test and a Wilcoxon signed-rank test (two-sided).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats
from tabulate import tabulate

from fewclip.aggregate import iter_values, summarise_values

COMPARE_COLUMNS = ("dataset", "method_a", "method_b", "shots", "eval_set", "pairs")


def compute_paired_test(values_a: list[float], values_b: list[float]) -> dict[str, Any]:
    """Paired difference statistics of two equally long lists (pair i = a[i], b[i]).

    Returns mean_a, mean_b, mean/std/ci95 of d = a - b, n, and two-sided p-values of the paired
    t-test and the Wilcoxon signed-rank test (None with fewer than 2 pairs, and for the t-test
    when all differences are equal but not 0; both 1.0 when every difference is 0).
    """
    if len(values_a) != len(values_b):
        raise ValueError(f"paired lists differ in length: {len(values_a)} vs {len(values_b)}")
    a, b = np.asarray(values_a, float), np.asarray(values_b, float)
    differences = a - b
    summary = summarise_values(differences.tolist())
    result = {
        "mean_a": float(a.mean()) if a.size else None,
        "mean_b": float(b.mean()) if b.size else None,
        "mean_diff": summary["mean"],
        "std_diff": summary["std"],
        "ci95_diff": summary["ci95"],
        "n": summary["n"],
        "t_test_p": None,
        "wilcoxon_p": None,
    }
    if differences.size < 2:
        return result
    if np.all(differences == 0):
        return {**result, "t_test_p": 1.0, "wilcoxon_p": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on tiny samples
        t_p = stats.ttest_rel(a, b).pvalue
        wilcoxon_p = stats.wilcoxon(a, b).pvalue
    # equal non-zero differences: the t statistic is undefined (zero variance), so no t p-value
    result["t_test_p"] = float(t_p) if math.isfinite(t_p) and summary["std"] > 0 else None
    result["wilcoxon_p"] = float(wilcoxon_p) if math.isfinite(wilcoxon_p) else None
    return result


def _by_method(records: list[dict[str, Any]], metric: str) -> dict[tuple, dict[str, dict]]:
    """(dataset, shots, eval_set) -> method "trainer/recipe" -> seed key -> value."""
    table: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for (dataset, trainer, recipe, shots, eval_set), seed, value in iter_values(records, metric):
        table[(dataset, shots, eval_set)][f"{trainer}/{recipe}"][seed] = value
    return table


def compare_records(
    records_a: list[dict[str, Any]], records_b: list[dict[str, Any]], metric: str
) -> list[dict[str, Any]]:
    """One row per (dataset, method A, method B, shots, eval set) with at least one matched seed.

    A method paired with identical values of itself (a sweep compared with itself) is left out.
    """
    table_a, table_b = _by_method(records_a, metric), _by_method(records_b, metric)
    rows = []
    for group in sorted(set(table_a) & set(table_b), key=lambda g: (str(g[0]), g[1], g[2])):
        dataset, shots, eval_set = group
        for method_a, seeds_a in sorted(table_a[group].items()):
            for method_b, seeds_b in sorted(table_b[group].items()):
                matched = sorted(set(seeds_a) & set(seeds_b))
                identical = method_a == method_b and all(seeds_a[s] == seeds_b[s] for s in matched)
                if not matched or identical:
                    continue
                test = compute_paired_test(
                    [seeds_a[s] for s in matched], [seeds_b[s] for s in matched]
                )
                row = dict(zip(COMPARE_COLUMNS, (dataset, method_a, method_b, shots, eval_set)))
                rows.append({**row, "pairs": len(matched), "metric": metric, **test})
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_comparison(rows: list[dict[str, Any]], label_a: str = "A", label_b: str = "B") -> str:
    """Markdown table of compare_records rows (differences in percentage points)."""
    if not rows:
        return "No runs of the two sweeps share dataset, shots, eval set and seeds.\n"
    metric = rows[0]["metric"]
    headers = [*COMPARE_COLUMNS, "mean A", "mean B", "A - B", "95% CI", "t-test p", "Wilcoxon p"]
    table = [
        [
            *(row[c] for c in COMPARE_COLUMNS),
            f"{row['mean_a'] * 100:.1f}",
            f"{row['mean_b'] * 100:.1f}",
            _percent(row["mean_diff"]),
            "-" if row["ci95_diff"] is None else f"± {row['ci95_diff'] * 100:.1f}",
            _p(row["t_test_p"]),
            _p(row["wilcoxon_p"]),
        ]
        for row in rows
    ]
    caption = (
        f"{metric} in percent; A = {label_a}, B = {label_b}; A - B is the mean paired difference "
        "over matched seeds (same training and split seed), two-sided p-values."
    )
    markdown = tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)
    return markdown + "\n\n" + caption + "\n"
