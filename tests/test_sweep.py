"""Sweeps: grid expansion, a killed worker loses no finished cell, retry of failed cells only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import run_shell
from fewclip.config import ConfigError
from fewclip.results import read_results
from fewclip.run import resolve_run_dir
from fewclip.sweep import WORKER_DIED, build_sweep, cell_statuses, expand_cells, run_cells

REPO = Path(__file__).resolve().parent.parent
ZEROSHOT = str(REPO / "configs" / "trainers" / "zeroshot.yaml")
SYNTHETIC = str(REPO / "configs" / "datasets" / "synthetic.yaml")
# A zero-shot method that fails or kills its own process when a marker file in OUTPUT_DIR says
# so: `fail_seed_<s>` raises; `kill_seed_<s>` waits until `<wait>` exists, then SIGKILLs itself.
PLUGIN = """
import os, signal, time
from pathlib import Path
from fewclip.registry import TRAINERS
from fewclip_trainers.zeroshot import ZeroShotCLIP

@TRAINERS.register()
class FlakyZeroShot(ZeroShotCLIP):
    def prepare(self, train):
        root = Path(self.cfg.OUTPUT_DIR)
        if (root / f"fail_seed_{self.cfg.SEED}").exists():
            raise RuntimeError("flaky failure")
        kill = root / f"kill_seed_{self.cfg.SEED}"
        if kill.exists():
            wait = root / kill.read_text().strip()
            while not wait.exists():  # the sweep's other cell has finished
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def plugin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugins") / "flaky.py"
    path.write_text(PLUGIN)
    return str(path)


def tiny_opts(tmp_path: Path, plugin: str, cache: Path) -> list[str]:
    return [
        "OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR", str(cache),
        "PLUGINS", plugin, "TRAINER.NAME", "FlakyZeroShot", "RECIPE", "flaky",
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12", "DATASET.NUM_SHOTS", "1",
    ]  # fmt: skip


def test_expand_cells_grid_order_and_variant_names():
    cells = expand_cells(
        datasets=["d1.yaml", "d2.yaml"],
        recipes=["r.yaml"],
        shots=[1, 4],
        seeds=[1, 2, 3],
        grid={"OPTIM.LR": [1e-3, 1e-4], "LORA.TARGETS": [["q", "v"]]},
        opts=["MODEL.NAME", "tiny-vit"],
    )
    assert len(cells) == 2 * 1 * 2 * 1 * 2 * 3
    first = cells[0]
    assert first.dataset_config == "d1.yaml" and first.recipe == "r.yaml"
    assert first.opts == (
        "MODEL.NAME", "tiny-vit", "OPTIM.LR", "0.001", "LORA.TARGETS", "q,v",
        "RECIPE", "r-lr0.001-targetsq+v", "DATASET.NUM_SHOTS", "1",
        "SEED", "1", "DATASET.SPLIT_SEED", "1",
    )  # fmt: skip
    # seeds vary fastest, then shots, then grid values, then recipes, then datasets
    assert [c.opts[-3] for c in cells[:3]] == ["1", "2", "3"]
    assert cells[3].opts[-5] == "4"
    assert dict(zip(cells[6].opts[0::2], cells[6].opts[1::2]))["RECIPE"] == "r-lr0.0001-targetsq+v"
    assert cells[12].dataset_config == "d2.yaml"
    assert expand_cells() == [expand_cells()[0]] and len(expand_cells()) == 1  # a single run


def test_sweep_file_and_cli_lists_share_the_expansion(tmp_path: Path):
    (tmp_path / "sweep.yaml").write_text(
        f"output_dir: {tmp_path / 'out'}\ndatasets: [{SYNTHETIC}]\nrecipes: [{ZEROSHOT}]\n"
        "shots: [1, 2]\nseeds: [1, 2]\ngrid: {EVAL.ECE_BINS: [10, 15]}\n"
        "opts: [DATASET.SYNTHETIC.IMAGES_PER_CLASS, 12]\n"
    )
    sweep = build_sweep(tmp_path / "sweep.yaml", seeds=[7])  # CLI lists win over the file
    assert len(sweep.cells) == 2 * 2 * 1
    assert sweep.root == tmp_path / "out"
    assert {cfg.SEED for cfg in sweep.configs} == {7}
    assert {cfg.RECIPE for cfg in sweep.configs} == {"zeroshot-ece_bins10", "zeroshot-ece_bins15"}
    assert len({resolve_run_dir(cfg) for cfg in sweep.configs}) == 4
    (tmp_path / "bad.yaml").write_text("seedz: [1]\n")
    with pytest.raises(ConfigError, match="seedz"):
        build_sweep(tmp_path / "bad.yaml")


@pytest.mark.slow
def test_killed_worker_loses_no_finished_cell_and_rerun_completes_it(
    tmp_path: Path, plugin, shared_cache
):
    opts = tiny_opts(tmp_path, plugin, shared_cache)
    sweep = build_sweep(None, [SYNTHETIC], seeds=[1, 2], opts=opts)
    cells = sweep.cells
    run_dirs = [resolve_run_dir(cfg) for cfg in sweep.configs]
    out = tmp_path / "out"
    out.mkdir()
    # seed 2 is SIGKILLed mid-cell, once the cell of seed 1 has finished
    (out / "kill_seed_2").write_text(str(run_dirs[0].relative_to(out) / "results.json"))
    results = run_cells(cells, jobs=2)
    assert [r["status"] for r in results] == ["complete", "failed"]
    assert results[1]["error"] == WORKER_DIED
    assert (run_dirs[1] / "traceback.txt").read_text().strip() == WORKER_DIED
    assert (run_dirs[1] / "config.yaml").is_file()  # it died inside the cell
    finished = (run_dirs[0] / "results.json").read_bytes()
    assert cell_statuses(sweep.configs) == ["complete", "failed"]

    (out / "kill_seed_2").unlink()
    rerun = run_cells(cells, jobs=1)  # the same cells again: only the killed one runs
    assert [r.get("skipped", False) for r in rerun] == [True, False]
    assert cell_statuses(sweep.configs) == ["complete", "complete"]
    assert (run_dirs[0] / "results.json").read_bytes() == finished


@pytest.mark.slow
def test_retry_failed_reruns_only_failed_cells(tmp_path: Path, plugin, shared_cache, capsys):
    opts = tiny_opts(tmp_path, plugin, shared_cache)
    flags = ["--dataset-config", SYNTHETIC, "--seeds", "1", "2"]
    argv = [*flags, *opts]
    out = tmp_path / "out"
    out.mkdir()
    (out / "fail_seed_2").touch()
    assert run_shell.main(argv) == 1  # one cell failed
    sweep = build_sweep(None, [SYNTHETIC], seeds=[1, 2], opts=opts)
    first, second = (resolve_run_dir(cfg) for cfg in sweep.configs)
    failed = read_results(second)
    assert failed["status"] == "failed" and "flaky failure" in failed["error"]
    assert "RuntimeError: flaky failure" in (second / "traceback.txt").read_text()
    assert "failed" in (out / "summary.md").read_text()
    kept = (first / "results.json").stat().st_mtime_ns

    capsys.readouterr()
    assert run_shell.main([*flags, "--dry-run", *opts]) == 0
    listing = capsys.readouterr().out
    assert f"complete  {first}" in listing and f"failed    {second}" in listing

    (out / "fail_seed_2").unlink()
    assert run_shell.main(["--retry-failed", *argv]) == 0
    assert read_results(second)["status"] == "complete"
    assert (first / "results.json").stat().st_mtime_ns == kept  # not touched
    manifest = json.loads((out / "sweep.json").read_text())
    assert len(manifest["run_dirs"]) == 2 and (out / "report.md").is_file()


def test_leave_one_center_out_makes_one_fold_per_center(fast_opts):
    from fewclip.sweep import build_sweep

    root = Path(__file__).resolve().parent.parent
    sweep = build_sweep(
        None,
        [str(root / "configs" / "datasets" / "synthetic.yaml")],
        [str(root / "configs" / "trainers" / "zeroshot.yaml")],
        shots=[2],
        seeds=[1],
        opts=fast_opts,
        leave_one_center_out=True,
    )
    folds = {
        cfg.RECIPE: (cfg.DATASET.SOURCE_CENTERS, cfg.DATASET.TARGET_CENTERS)
        for cfg in sweep.configs
    }
    assert folds == {
        "zeroshot-loco_center_a": (["center_b", "center_c"], ["center_a"]),
        "zeroshot-loco_center_b": (["center_a", "center_c"], ["center_b"]),
        "zeroshot-loco_center_c": (["center_a", "center_b"], ["center_c"]),
    }
