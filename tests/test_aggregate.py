"""Aggregation and sweep comparison on hand-made results trees (no model runs)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from fewclip.aggregate import (
    aggregate_folder,
    collect_results,
    mark_worst_centers,
    render_tables,
    summarise_values,
    write_summary,
)
from fewclip.compare import compare_records, compute_paired_test, render_comparison


def write_run(
    root: Path,
    trainer: str,
    shots: int,
    seed: int,
    test: float | None = None,
    targets: dict[str, float] | None = None,
    status: str = "complete",
    recipe: str = "r",
) -> Path:
    """A results.json with accuracy = balanced_accuracy = the given value per eval set."""
    run_dir = root / "Data" / trainer / recipe / f"shots_{shots}" / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    metrics: dict = {}
    if test is not None:
        metrics["test"] = {"accuracy": test, "balanced_accuracy": test}
    if targets:
        metrics["targets"] = {
            c: {"accuracy": v, "balanced_accuracy": v} for c, v in targets.items()
        }
    config = {
        "DATASET": {"NAME": "Data", "NUM_SHOTS": shots, "SPLIT_SEED": seed},
        "TRAINER": {"NAME": trainer},
        "RECIPE": recipe,
        "SEED": seed,
    }
    payload = {"status": status, "config": config, "metrics": metrics}
    if status != "complete":
        payload = {"status": status, "config": config, "error": "RuntimeError: boom"}
    (run_dir / "results.json").write_text(json.dumps(payload))
    return run_dir


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Method A: 3 seeds at 4 shots (one target center much worse); a failed seed, a missing one
    (listed in sweep.json only), a half-written results.json; method B: 2 seeds."""
    root = tmp_path / "sweep"
    for seed, (test, center_b, center_c) in enumerate(
        [(0.5, 0.4, 0.2), (0.7, 0.6, 0.3), (0.9, 0.8, 0.4)], start=1
    ):
        write_run(root, "A", 4, seed, test, {"center_b": center_b, "center_c": center_c})
    write_run(root, "A", 4, 4, status="failed")
    broken = write_run(root, "A", 4, 5, 0.1)
    (broken / "results.json").write_text('{"status": "compl')  # killed while writing by hand
    write_run(root, "B", 4, 1, 0.6)
    write_run(root, "B", 4, 2, 0.8)
    run_dirs = [f"Data/A/r/shots_4/seed_{s}" for s in range(1, 7)]
    (root / "sweep.json").write_text(json.dumps({"run_dirs": run_dirs}))
    return root


def test_summarise_values_by_hand():
    summary = summarise_values([0.5, 0.7, 0.9])
    assert summary["mean"] == pytest.approx(0.7)
    assert summary["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert summary["ci95"] == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-6)
    assert summary["n"] == 3
    assert summarise_values([0.4]) == {"mean": 0.4, "std": 0.0, "ci95": None, "n": 1}
    assert summarise_values([])["mean"] is None


def test_aggregate_tree_with_missing_and_failed_cells(tree: Path):
    result = aggregate_folder(tree, ("balanced_accuracy", "accuracy"))
    rows = {(r["trainer"], r["eval_set"]): r for r in result["rows"]}
    assert sorted(rows) == [
        ("A", "in-domain"),
        ("A", "target:center_b"),
        ("A", "target:center_c"),
        ("B", "in-domain"),
    ]
    in_domain = rows[("A", "in-domain")]
    assert in_domain["seeds"] == 3
    assert in_domain["accuracy"]["mean"] == pytest.approx(0.7)
    assert in_domain["accuracy"]["std"] == pytest.approx(0.2)
    assert rows[("A", "target:center_c")]["balanced_accuracy"]["mean"] == pytest.approx(0.3)
    assert rows[("A", "target:center_c")]["worst"] and not rows[("A", "target:center_b")]["worst"]
    assert not in_domain["worst"]
    assert rows[("B", "in-domain")]["accuracy"]["mean"] == pytest.approx(0.7)
    assert [Path(f["path"]).parent.name for f in result["failed"]] == ["seed_4"]
    assert [Path(f["path"]).parent.name for f in result["incomplete"]] == ["seed_5"]
    assert result["missing"] == ["Data/A/r/shots_4/seed_6"]


def test_tables_list_problems_and_csv_holds_numbers(tree: Path):
    tables = write_summary(tree, ("accuracy",))
    assert "target:center_c (worst)" in tables["terminal"]
    assert "70.0 ± 20.0" in tables["markdown"]
    markdown = (tree / "summary.md").read_text()
    assert "- failed:" in markdown and "RuntimeError: boom" in markdown
    assert "- missing: Data/A/r/shots_4/seed_6" in markdown
    assert "- incomplete:" in markdown and "unreadable" in markdown
    rows = list(csv.DictReader(io.StringIO((tree / "summary.csv").read_text())))
    first = rows[0]
    assert (first["trainer"], first["eval_set"], first["seeds"]) == ("A", "in-domain", "3")
    assert float(first["accuracy_mean"]) == pytest.approx(0.7)
    assert float(first["accuracy_ci95"]) == pytest.approx(4.302653 * 0.2 / math.sqrt(3))
    assert first["accuracy_n"] == "3"
    assert render_tables(aggregate_folder(tree))["table_markdown"].count("\n|") == 5


def test_paired_test_by_hand():
    a, b = [0.6, 0.8, 0.7], [0.5, 0.6, 0.65]  # differences 0.1, 0.2, 0.05
    result = compute_paired_test(a, b)
    differences_std = math.sqrt(
        ((0.1 - 0.35 / 3) ** 2 + (0.2 - 0.35 / 3) ** 2 + (0.05 - 0.35 / 3) ** 2) / 2
    )
    t = (0.35 / 3) / (differences_std / math.sqrt(3))

    assert result["mean_diff"] == pytest.approx(0.35 / 3)
    assert result["std_diff"] == pytest.approx(differences_std)
    assert result["t_test_p"] == pytest.approx(2 * stats.t.sf(t, 2))
    assert result["wilcoxon_p"] == pytest.approx(0.25)  # exact: all 3 signs positive, 2/2^3
    assert compute_paired_test([0.5, 0.6], [0.5, 0.6])["t_test_p"] == 1.0
    assert compute_paired_test([0.5], [0.4])["t_test_p"] is None
    assert compute_paired_test([0.5, 0.6], [0.4, 0.5])["t_test_p"] is None  # zero variance
    with pytest.raises(ValueError, match="length"):
        compute_paired_test([0.1], [0.1, 0.2])


def test_compare_sweeps_pairs_matched_seeds_only(tree: Path, tmp_path: Path):
    baseline = tmp_path / "baseline"
    for seed, value in [(1, 0.45), (2, 0.5), (9, 0.1)]:  # seed 9 has no partner
        write_run(baseline, "Base", 4, seed, value)
    rows = compare_records(collect_results(tree), collect_results(baseline), "accuracy")
    assert [(r["method_a"], r["method_b"], r["pairs"]) for r in rows] == [
        ("A/r", "Base/r", 2),
        ("B/r", "Base/r", 2),
    ]
    assert rows[0]["mean_diff"] == pytest.approx(((0.5 - 0.45) + (0.7 - 0.5)) / 2)
    text = render_comparison(rows, "method", "baseline")
    assert "Wilcoxon p" in text and "+12.5" in text
    itself = compare_records(collect_results(tree), collect_results(tree), "accuracy")
    assert [(r["method_a"], r["method_b"]) for r in itself] == [("A/r", "B/r"), ("B/r", "A/r")]


def test_worst_center_ties_mark_all_lowest_and_equal_centers_none():
    def row(trainer: str, center: str, mean: float) -> dict:
        key = dict(dataset="D", trainer=trainer, recipe="r", shots=1, eval_set=f"target:{center}")
        return {**key, "accuracy": {"mean": mean}}

    rows = [row("A", "b", 0.2), row("A", "c", 0.2), row("A", "d", 0.5)]
    rows += [row("Z", "b", 0.25), row("Z", "c", 0.25)]
    mark_worst_centers(rows, "accuracy")
    assert [r["worst"] for r in rows] == [True, True, False, False, False]
