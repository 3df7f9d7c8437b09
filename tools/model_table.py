"""What works where: one row per trainer, one column per model, from a sweep over MODEL.NAME.

    python run_shell.py --sweep configs/sweeps/families.yaml --jobs 2
    python tools/model_table.py output/families            # print the markdown table
    python tools/model_table.py output/families --readme README.md   # replace its table block

A cell is the in-domain balanced accuracy (mean over seeds, percent) of a complete run, or
"no: <reason>" with the one-line error of a run that stopped (e.g. a method that needs patch
tokens on a ResNet). The README block lies between `<!-- model-table -->` and
`<!-- /model-table -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fewclip.aggregate import collect_results, eval_sets

BEGIN, END = "<!-- model-table -->", "<!-- /model-table -->"
METRIC = "balanced_accuracy"


def model_table(root: str | Path) -> str:
    """The markdown table of the results under `root` (trainer x MODEL.NAME)."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    errors: dict[tuple[str, str], str] = {}
    trainers: dict[str, None] = {}
    models: dict[str, None] = {}
    for record in collect_results(root):
        cfg = record.get("config")
        if not isinstance(cfg, dict):
            continue
        trainer = f"`{cfg['TRAINER']['NAME']}` (`{cfg['RECIPE'].split('-name')[0]}`)"
        model = cfg["MODEL"]["NAME"] or cfg["MODEL"]["HF_HUB"]
        trainers.setdefault(trainer)
        models.setdefault(model)
        if record.get("status") == "complete":
            value = eval_sets(record.get("metrics", {})).get("in-domain", {}).get(METRIC)
            if value is not None:
                scores[trainer, model].append(100 * float(value))
        elif record.get("error"):
            errors[trainer, model] = _reason(record["error"])
    if not trainers:
        raise SystemExit(f"model_table: no results.json under {root}")
    header = ["trainer (recipe)", *(f"`{model}`" for model in models)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trainer in trainers:
        cells = []
        for model in models:
            values = scores.get((trainer, model))
            if values:
                cells.append(f"{np.mean(values):.1f}")
            else:
                cells.append(f"no: {errors[trainer, model]}" if (trainer, model) in errors else "")
        lines.append("| " + " | ".join([trainer, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _reason(error: str) -> str:
    """The part of a one-line error after the last colon that says why ("no patch tokens")."""
    message = error.split(": ", 1)[-1]
    return message.rsplit(": ", 1)[-1].replace("|", "/")


def replace_block(text: str, table: str, source: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"model_table: {source} has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder of a sweep over MODEL.NAME")
    parser.add_argument("--readme", help="replace the model-table block of this file")
    args = parser.parse_args(argv)
    table = model_table(args.root)
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_block(path.read_text(), table, str(path)))
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
