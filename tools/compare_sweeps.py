"""Compare two sweeps (A: a method, B: a baseline) on runs with matched seeds.

    python tools/compare_sweeps.py output/method output/baseline --metric balanced_accuracy

Prints the paired differences (A - B, 95% CI, paired t-test and Wilcoxon p-values) and writes
A's report.md with the comparison section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewclip.aggregate import PRIMARY_METRIC
from fewclip.report import build_comparison, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("sweep_a", help="sweep folder of the method")
    parser.add_argument("sweep_b", help="sweep folder of the baseline")
    parser.add_argument("--metric", default=PRIMARY_METRIC, help="metric compared")
    parser.add_argument("--no-report", action="store_true", help="print only, write nothing")
    args = parser.parse_args(argv)
    for folder in (args.sweep_a, args.sweep_b):
        if not Path(folder).is_dir():
            parser.error(f"sweep folder {folder} does not exist")
    rows, text = build_comparison(args.sweep_a, args.sweep_b, args.metric)
    print(text)
    if not args.no_report:
        path, _ = write_report(args.sweep_a, primary=args.metric, compare_with=args.sweep_b)
        print(f"report: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
