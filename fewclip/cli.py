"""fewclip command line: one run, or a sweep over shots x seeds (x datasets x recipes x keys).

`fewclip ...` (the installed command) and `python run_shell.py ...` are the same program:

    python run_shell.py                          # the demo sweep (tiny CLIP, generated data)
    python run_shell.py --sweep configs/sweeps/demo.yaml --jobs 2
    python run_shell.py --recipe configs/trainers/clip_lora.yaml \
        --dataset-config configs/datasets/synthetic.yaml --shots 1 4 --seeds 1 2 3 OPTIM.LR 1e-3
    python run_shell.py --sweep my.yaml --launcher slurm --partition gpu --gpus 1 --time 120
    torchrun --nproc_per_node 2 run_shell.py --recipe ... --shots 16 --seeds 1   # one run, DDP
    python run_shell.py --aggregate output/demo           # tables from existing results
    python run_shell.py --report output/method --compare output/baseline   # report + paired test

Flags are actions; values go through trailing `KEY VALUE` opts (see README for the keys).
A sweep ends with summary.md/csv, figures and report.md in its folder (OUTPUT_DIR); a one-cell
command with summary.md/csv (`--report FOLDER` draws its figures later).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

# Only light modules at the top: importing this module and `--help` never import torch, and
# `--dry-run` or a config error never import open_clip, scipy or matplotlib (test_startup.py).
from fewclip.aggregate import DEFAULT_METRICS, PRIMARY_METRIC, write_summary
from fewclip.config import OPT_KEY, ConfigError
from fewclip.launchers import LAUNCHERS
from fewclip.registry import RegistryError, load_installed_plugins
from fewclip.threads import choose_wait_policy

# The project folder of an editable install (pip install -e .): configs/ lives beside fewclip/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (`--jobs 0`, `--shots 0` are errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sweep", help="sweep YAML (default with no other flags: the demo sweep)")
    parser.add_argument("--recipe", nargs="+", default=[], help="trainer recipe YAML file(s)")
    parser.add_argument("--dataset-config", nargs="+", default=[], help="dataset YAML file(s)")
    parser.add_argument("--shots", nargs="+", type=positive_int, default=[], help="shot counts")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[], help="seeds (training and split)"
    )
    parser.add_argument("--jobs", type=positive_int, default=1, help="local worker processes")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and which are done")
    parser.add_argument(
        "--leave-one-center-out", action="store_true", help="one fold per held-out center"
    )
    parser.add_argument("--retry-failed", action="store_true", help="re-run only failed cells")
    parser.add_argument("--aggregate", metavar="DIR", help="only aggregate the results under DIR")
    parser.add_argument("--report", metavar="DIR", help="only write the report of sweep DIR")
    parser.add_argument("--compare", metavar="DIR", help="add a paired comparison with sweep DIR")
    parser.add_argument("--metric", default=PRIMARY_METRIC, help="metric of figures and tests")
    parser.add_argument(
        "--list-models",
        action="store_true",
        help="print the model families, the medical models known to load and the trainers that"
        " apply to each, then exit",
    )
    slurm = parser.add_argument_group("cluster (override the sweep file's `slurm:` keys)")
    slurm.add_argument("--launcher", choices=LAUNCHERS, default="local", help="where cells run")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--gpus", type=int, help="GPUs per task")
    slurm.add_argument("--time", type=int, help="minutes per task")
    slurm.add_argument("--array-parallelism", type=int, help="array tasks running at once")
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs, then report")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides (after the flags)")
    split = next((i for i, token in enumerate(argv) if OPT_KEY.match(token)), len(argv))
    flags, opts, index = list(argv[:split]), [], split
    while index < len(argv):  # flags may follow the opts too: `... OPTIM.LR 1e-3 --dry-run`
        if argv[index].startswith("--"):
            flags.append(argv[index])
            index += 1
            while index < len(argv) and not argv[index].startswith("-"):
                if OPT_KEY.match(argv[index]):
                    break
                flags.append(argv[index])  # the flag's values (--shots 1 4)
                index += 1
        else:
            opts += argv[index : index + 2]
            index += 2
    args = parser.parse_args(flags)
    args.opts = [*args.opts, *opts]
    return args


def run(argv: list[str] | None = None) -> int:
    """The command line on `argv` (default: sys.argv[1:]); returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, folder in (("--aggregate", args.aggregate), ("--report", args.report)):
        if folder and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder}: no such folder (give a sweep's output folder)")
        if folder and not any(Path(folder).rglob("results.json")):
            raise ConfigError(f"{flag} {folder}: no results.json under it: nothing has run there")
    if args.aggregate:  # reads results.json files only: no plugins, no torch
        print(write_summary(args.aggregate)["terminal"])
        return 0
    if args.report:
        from fewclip.report import write_report

        path, table = write_report(args.report, primary=args.metric, compare_with=args.compare)
        print(f"{table}\n\nreport: {path}")
        return 0
    if not (args.dry_run or args.list_models):  # a command that computes: before torch loads
        choose_wait_policy()  # passive OpenMP waits on busy CPUs
    load_installed_plugins()  # the built-in datasets and trainers, and installed plugin packages
    if args.list_models:
        from fewclip.catalogue import describe_models
        from fewclip.registry import TRAINERS

        print(describe_models(TRAINERS.get(name) for name in TRAINERS.names()))
        return 0
    from fewclip import distributed
    from fewclip.sweep import build_sweep, cell_statuses, describe_cells, run_cells, write_manifest

    distributed.init_from_env()  # under torchrun: join the process group, one run at a time
    sweep_file = args.sweep or (None if args.recipe or args.dataset_config else DEMO_SWEEP)
    if sweep_file == DEMO_SWEEP and not DEMO_SWEEP.is_file():
        raise ConfigError(
            f"the demo sweep {DEMO_SWEEP} is not here: run the demo from a checkout installed "
            "with pip install -e ., or pass --sweep / --recipe and --dataset-config"
        )
    sweep = build_sweep(
        sweep_file,
        args.dataset_config,
        args.recipe,
        args.shots,
        args.seeds,
        args.opts,
        args.leave_one_center_out,
    )
    statuses = cell_statuses(sweep.configs)
    if args.dry_run:
        print(describe_cells(sweep.configs, statuses))
        return 0
    cells = [
        cell
        for cell, status in zip(sweep.cells, statuses)
        if not args.retry_failed or status in ("failed", "diverged")
    ]
    if distributed.is_main_process():
        write_manifest(sweep.root, sweep.configs)
    if args.launcher == "local":
        if distributed.is_active() and args.jobs > 1:
            raise ConfigError("under torchrun the processes share each run: use --jobs 1")
        try:
            results = run_cells(cells, jobs=args.jobs)
        except KeyboardInterrupt:  # finished cells are saved; summarise them, then stop
            print(finish(sweep.root, len(sweep.cells), args))
            print("interrupted: the summary holds the complete cells; rerun the same command to "
                  "run the rest (interrupted runs resume from their training state)")  # fmt: skip
            return 130
    else:
        from fewclip.launchers import resolve_slurm_options, submit_cells, wait_for_jobs

        flags = {"partition": args.partition, "gpus": args.gpus, "time": args.time}
        options = resolve_slurm_options(
            sweep.slurm, {**flags, "array_parallelism": args.array_parallelism}
        )
        folder = options["folder"] or sweep.root / "slurm"
        jobs = submit_cells(cells, args.launcher, folder, options)
        print(f"submitted {len(jobs)} cells; logs in {folder}")
        if not args.wait:
            print(f"when they are done: fewclip --report {sweep.root}")
            return 0
        results = wait_for_jobs(jobs)
    if not distributed.is_main_process():
        return 0
    print(finish(sweep.root, len(sweep.cells), args))
    failed = [r for r in results if r.get("status") not in ("complete", "locked")]
    return 1 if failed else 0


def finish(root: Path, cells: int, args: argparse.Namespace) -> str:
    """Summarise a finished command's folder: the table, and where its files are.

    A sweep writes summary.md/csv, figures and report.md. A one-cell command writes the summary
    only: drawing its confusion matrices and reliability diagram (matplotlib) was about 2 s of a
    tiny run's 14, for files `fewclip --report` makes later at the same cost. `--compare` always
    writes the report, since the comparison is in it.
    """
    if cells == 1 and args.compare is None:
        tables = write_summary(root, tuple(dict.fromkeys((args.metric, *DEFAULT_METRICS))))
        return (
            f"{tables['terminal']}\n\nsummary: {root / 'summary.md'} "
            f"(figures and report: fewclip --report {root})"
        )
    from fewclip.report import write_report  # matplotlib and scipy: only once cells have run

    path, table = write_report(root, primary=args.metric, compare_with=args.compare)
    return f"{table}\n\nsummary: {root / 'summary.md'}, report: {path}"


def main(argv: list[str] | None = None) -> int:
    """The command's work, callable from Python: a config error is one line."""
    try:
        return run(argv)
    except (ConfigError, RegistryError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2


def console() -> int:
    """Entry point of the `fewclip` command and run_shell.py: `main`, then a quick exit.

    What is still alive when the command is done moves to the collector's permanent generation
    (gc.freeze), so the interpreter's exit does not walk it again: with torch and open_clip
    loaded, exit took 1.5-2.0 s here, 0.3-0.5 s frozen (tools/benchmark_startup.py). Exit still
    runs the atexit handlers and flushes the standard streams, and the command's files are
    closed by then.
    """
    status = main()
    gc.freeze()
    return status
