"""fewclip command line: one run, or a sweep over shots x seeds (x datasets x recipes x keys).

    python run_shell.py                          # the demo sweep (tiny CLIP, generated data)
    python run_shell.py --sweep configs/sweeps/demo.yaml --jobs 2
    python run_shell.py --recipe configs/trainers/clip_lora.yaml \
        --dataset-config configs/datasets/synthetic.yaml --shots 1 4 --seeds 1 2 3 OPTIM.LR 1e-3
    python run_shell.py --aggregate output/demo           # tables from existing results

Flags are actions; values go through trailing `KEY VALUE` opts (see README for the keys).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewclip.aggregate import write_summary  # noqa: E402
from fewclip.config import ConfigError  # noqa: E402
from fewclip.results import read_results  # noqa: E402
from fewclip.sweep import build_cell_config, expand_cells, load_sweep_file, run_cells  # noqa: E402

OPT_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")  # where the KEY VALUE opts begin
DEMO_SWEEP = Path(__file__).resolve().parent / "configs" / "sweeps" / "demo.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sweep", help="sweep YAML (default with no other flags: the demo sweep)")
    parser.add_argument("--recipe", nargs="+", default=[], help="trainer recipe YAML file(s)")
    parser.add_argument("--dataset-config", nargs="+", default=[], help="dataset YAML file(s)")
    parser.add_argument("--shots", nargs="+", type=int, default=[], help="shot counts")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[], help="seeds (training and split)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and which are done")
    parser.add_argument("--retry-failed", action="store_true", help="re-run only failed cells")
    parser.add_argument("--aggregate", metavar="DIR", help="only aggregate the results under DIR")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides (after the flags)")
    split = next((i for i, token in enumerate(argv) if OPT_KEY.match(token)), len(argv))
    args = parser.parse_args(argv[:split])
    args.opts = [*args.opts, *argv[split:]]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.aggregate:
        print(write_summary(args.aggregate)["terminal"])
        return 0
    sweep_file = args.sweep or (None if args.recipe or args.dataset_config else DEMO_SWEEP)
    spec = load_sweep_file(sweep_file) if sweep_file else {}
    opts = [*spec.get("opts", []), *args.opts]
    output_dir = spec.get("output_dir")
    if output_dir and "OUTPUT_DIR" not in args.opts[0::2]:
        opts = [*opts, "OUTPUT_DIR", str(output_dir)]
    cells = expand_cells(
        datasets=args.dataset_config or spec.get("datasets", [""]),
        recipes=args.recipe or spec.get("recipes", [""]),
        shots=args.shots or spec.get("shots", []),
        seeds=args.seeds or spec.get("seeds", []),
        grid=spec.get("grid"),
        opts=[str(value) for value in opts],
    )
    configs = [build_cell_config(cell) for cell in cells]  # every cell's config fails here, early
    from fewclip.run import resolve_run_dir

    statuses = [(read_results(resolve_run_dir(cfg)) or {}).get("status", "todo") for cfg in configs]
    if args.dry_run:
        for cfg, status in zip(configs, statuses):
            print(f"{status:9s} {resolve_run_dir(cfg)}")
        print(f"{len(cells)} cells, {statuses.count('complete')} complete")
        return 0
    if args.retry_failed:
        cells = [c for c, s in zip(cells, statuses) if s in ("failed", "diverged")]
    results = run_cells(cells, jobs=args.jobs)
    root = Path(configs[0].OUTPUT_DIR) if configs else Path("output")
    tables = write_summary(root)
    print(tables["terminal"])
    print(f"\nsummary: {root / 'summary.md'} and {root / 'summary.csv'}")
    failed = [r for r in results if r.get("status") not in ("complete", "locked")]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        sys.exit(f"config error: {error}")
