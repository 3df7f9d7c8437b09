"""The README's result tables, generated from the sweeps that produce them, and checked.

    python tools/readme_tables.py --run            # run the sweeps, rewrite the README's tables
    python tools/readme_tables.py                  # rewrite them from the existing outputs
    python tools/readme_tables.py --run --check    # CI: fail if a table is not what the code gives
    python tools/readme_tables.py --check demo     # one table

Each table lies in README.md between `<!-- table:NAME -->` and `<!-- /table:NAME -->`:

- demo: configs/sweeps/demo.yaml, trainer x shots, balanced accuracy per eval set;
- methods: configs/sweeps/methods.yaml, one row per recipe, with macro-F1 and seconds per cell;
- models: configs/sweeps/families.yaml, trainer x model family (what works where).

`--check` compares every cell of the README with the freshly rendered table: the same rows,
columns and words, numbers within --tolerance percentage points (floating-point differences
between CPUs can move a balanced accuracy by a test image), wall-time columns not compared.
A sweep skips the cells it has already run, so `--run` after a change reruns only what changed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fewclip.aggregate import aggregate_folder, collect_results, eval_sets

ROOT = Path(__file__).resolve().parent.parent

METRIC = "balanced_accuracy"
NUMBER = re.compile(r"^-?\d+(\.\d+)?( ± (-?\d+(\.\d+)?|n/a))?$")
VOLATILE = ("seconds",)  # columns whose header holds one of these are wall times: not compared


@dataclass(frozen=True)
class Table:
    sweep: str  # the sweep file, relative to the repository root
    render: Callable[[Path, list[str]], str]  # (output folder, recipe stems in order) -> markdown


def sweep_spec(sweep: str) -> tuple[Path, list[str]]:
    """(output folder, recipe stems in the file's order) of a sweep file."""
    spec = yaml.safe_load((ROOT / sweep).read_text())
    return ROOT / spec["output_dir"], [Path(recipe).stem for recipe in spec.get("recipes", [])]


def percent(summary: dict) -> str:
    """`mean ± std` in percent; `± n/a` for one seed."""
    if summary["mean"] is None:
        return "-"
    std = "n/a" if summary["n"] < 2 else f"{summary['std'] * 100:.1f}"
    return f"{summary['mean'] * 100:.1f} ± {std}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _by_cell(root: Path) -> tuple[dict[tuple, dict[str, dict]], list[str]]:
    """{(trainer, recipe, shots): {eval set: aggregated row}} and the eval sets, in-domain first."""
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in aggregate_folder(root)["rows"]:
        cells[row["trainer"], row["recipe"], row["shots"]][row["eval_set"]] = row
    sets = sorted({s for rows in cells.values() for s in rows}, key=lambda s: (s != "in-domain", s))
    return cells, sets


def _set_label(eval_set: str) -> str:
    return eval_set.replace("target:", "target ").replace("cross:", "cross ")


def demo_table(root: Path, recipes: list[str]) -> str:
    cells, sets = _by_cell(root)
    order = sorted(cells, key=lambda key: (recipes.index(key[1]), key[2]))
    header = ["trainer", "shots", *(_set_label(s) for s in sets)]
    rows = [
        [trainer, str(shots), *(percent(cells[key][s][METRIC]) if s in cells[key] else "-"
                                for s in sets)]
        for key in order
        for trainer, _, shots in [key]
    ]  # fmt: skip
    return _markdown(header, rows)


def methods_table(root: Path, recipes: list[str]) -> str:
    cells, sets = _by_cell(root)
    seconds: dict[str, list[float]] = defaultdict(list)
    for record in collect_results(root):
        if record.get("status") == "complete":
            seconds[record["config"]["RECIPE"]].append(record["timings"]["total_seconds"])
    order = sorted(cells, key=lambda key: recipes.index(key[1]))
    header = ["trainer (recipe)", *(_set_label(s) for s in sets)]
    header += ["macro-F1 in-domain", "seconds per cell"]
    rows = []
    for key in order:
        trainer, recipe, _ = key
        row = [f"`{trainer}` (`{recipe}`)"]
        row += [percent(cells[key][s][METRIC]) if s in cells[key] else "-" for s in sets]
        row.append(percent(cells[key]["in-domain"]["macro_f1"]))
        row.append(f"{np.mean(seconds[recipe]):.1f}")
        rows.append(row)
    return _markdown(header, rows)


def model_table(root: Path, recipes: list[str]) -> str:
    """trainer (recipe) x MODEL.NAME: in-domain balanced accuracy (mean over seeds), or
    "no: <reason>" with the one-line error of a run that stopped."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    errors: dict[tuple[str, str], str] = {}
    rows_of: dict[str, tuple[int, str]] = {}
    models: dict[str, None] = {}
    for record in collect_results(root):
        cfg = record.get("config")
        if not isinstance(cfg, dict):
            continue
        recipe = cfg["RECIPE"].split("-name")[0]  # the grid suffix of MODEL.NAME
        trainer = f"`{cfg['TRAINER']['NAME']}` (`{recipe}`)"
        model = cfg["MODEL"]["NAME"] or cfg["MODEL"]["HF_HUB"]
        rows_of[trainer] = (recipes.index(recipe) if recipe in recipes else len(recipes), trainer)
        models.setdefault(model)
        if record.get("status") == "complete":
            value = eval_sets(record.get("metrics", {})).get("in-domain", {}).get(METRIC)
            if value is not None:
                scores[trainer, model].append(100 * float(value))
        elif record.get("error"):
            errors[trainer, model] = "no: " + _reason(record["error"])
    if not rows_of:
        raise SystemExit(f"readme_tables: no results.json under {root}")
    order = sorted(models, key=lambda m: (m.startswith("twin:"), m))
    rows = []
    for _, trainer in sorted(rows_of.values()):
        values = [scores.get((trainer, model)) for model in order]
        rows.append(
            [trainer]
            + [
                f"{np.mean(v):.1f}" if v else errors.get((trainer, model), "-")
                for v, model in zip(values, order)
            ]
        )
    return _markdown(["trainer (recipe)", *(f"`{model}`" for model in order)], rows)


def _reason(error: str) -> str:
    """The part of a one-line error that says why: after its last ': ' ("no patch tokens")."""
    return error.rsplit(": ", 1)[-1].replace("|", "/")


TABLES = {
    "demo": Table("configs/sweeps/demo.yaml", demo_table),
    "methods": Table("configs/sweeps/methods.yaml", methods_table),
    "models": Table("configs/sweeps/families.yaml", model_table),
}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)(<!-- /table:{name} -->)", re.S)


def replace_block(text: str, name: str, table: str, source: str) -> str:
    pattern = block_pattern(name)
    if not pattern.search(text):
        raise SystemExit(f"readme_tables: {source} has no <!-- table:{name} --> block")
    return pattern.sub(lambda match: match.group(1) + table + match.group(3), text, count=1)


def _cells(table: str) -> list[list[str]]:
    lines = [line for line in table.strip().splitlines() if not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def compare_tables(written: str, rendered: str, tolerance: float) -> list[str]:
    """Differences between the README's table and the rendered one (empty: current)."""
    old, new = _cells(written), _cells(rendered)
    if len(old) != len(new) or (old and old[0] != new[0]):
        return [f"rows or columns differ: README has {len(old)} lines, the outputs give {len(new)}"]
    volatile = [any(word in column for word in VOLATILE) for column in new[0]]
    problems = []
    for old_row, new_row in zip(old[1:], new[1:]):
        if len(old_row) != len(new_row):
            return [f"row {new_row[0]}: {len(old_row)} cells in the README, {len(new_row)} now"]
        for column, (a, b, skip) in enumerate(zip(old_row, new_row, volatile)):
            if skip or a == b:
                continue
            if NUMBER.match(a) and NUMBER.match(b) and _close(a, b, tolerance):
                continue
            problems.append(f"row {new_row[0]}, column {new[0][column]}: README {a!r}, now {b!r}")
    return problems


def _close(a: str, b: str, tolerance: float) -> bool:
    parts_a, parts_b = a.split(" ± "), b.split(" ± ")
    if len(parts_a) != len(parts_b):
        return False
    for x, y in zip(parts_a, parts_b):
        if (x == "n/a") != (y == "n/a") or (x != "n/a" and abs(float(x) - float(y)) > tolerance):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"tables ({', '.join(TABLES)}; default all)")
    parser.add_argument("--run", action="store_true", help="run the sweeps first")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--jobs", type=int, default=2, help="sweep worker processes")
    parser.add_argument("--tolerance", type=float, default=1.0, help="percentage points")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in TABLES]
    if unknown:
        raise SystemExit(f"readme_tables: unknown table {unknown}; choose from {', '.join(TABLES)}")
    readme = Path(args.readme)
    text = readme.read_text()
    failures = []
    for name in args.names or list(TABLES):
        table = TABLES[name]
        if args.run:
            command = [sys.executable, str(ROOT / "run_shell.py"), "--sweep", table.sweep]
            done = subprocess.run([*command, "--jobs", str(args.jobs)], cwd=ROOT, check=False)
            if done.returncode not in (0, 1):  # 1: some cells failed, which a table may show
                raise SystemExit(
                    f"readme_tables: the sweep {table.sweep} stopped ({done.returncode})"
                )
        output, recipes = sweep_spec(table.sweep)
        rendered = table.render(output, recipes)
        if args.check:
            match = block_pattern(name).search(text)
            if match is None:
                raise SystemExit(f"readme_tables: {readme} has no <!-- table:{name} --> block")
            problems = compare_tables(match.group(2), rendered, args.tolerance)
            failures += [f"{name}: {problem}" for problem in problems]
            print(f"{name}: {'current' if not problems else f'{len(problems)} differences'}")
        else:
            text = replace_block(text, name, rendered, str(readme))
    if args.check:
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        if failures:
            print("run `python tools/readme_tables.py --run` and commit README.md", file=sys.stderr)
        return 1 if failures else 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
