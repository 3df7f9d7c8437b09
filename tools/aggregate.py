"""Aggregate a sweep folder: tables (terminal, summary.md, summary.csv), figures and report.md.

    python tools/aggregate.py output/demo
    python tools/aggregate.py output/demo --metrics accuracy auroc binary_auroc --no-report

Reads results.json files only; cells listed in the sweep's sweep.json without results are
reported as missing, failed ones with their error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewclip.aggregate import DEFAULT_METRICS, PRIMARY_METRIC, write_summary
from fewclip.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folder", help="sweep folder (the sweep's OUTPUT_DIR)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="table columns")
    parser.add_argument("--primary", default=PRIMARY_METRIC, help="metric of the figures")
    parser.add_argument("--no-report", action="store_true", help="tables only, no figures")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"sweep folder {args.folder} does not exist")
    if args.no_report:
        print(write_summary(args.folder, tuple(args.metrics))["terminal"])
        return 0
    path, table = write_report(args.folder, tuple(args.metrics), args.primary)
    print(f"{table}\n\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
