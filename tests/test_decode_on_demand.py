"""A one-off run decodes only the images it reads; a sweep keeps its decode-once store (same key,
same rows), and a later sweep on the same cache decodes only what the one-off run left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fewclip import images as images_module
from fewclip.config import build_config
from fewclip.data import Item
from fewclip.images import ImageStore, compute_store_items
from fewclip.registry import DATASETS
from fewclip.splits import build_split
from fewclip.sweep import Cell, run_cells
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = str(ROOT / "configs" / "datasets" / "synthetic.yaml")
ZEROSHOT = str(ROOT / "configs" / "trainers" / "zeroshot.yaml")


def count_decoded(monkeypatch) -> list[str]:
    decoded: list[str] = []
    original = images_module.decode_paths

    def counting(paths, image_size):
        decoded.extend(paths)
        return original(paths, image_size)

    monkeypatch.setattr(images_module, "decode_paths", counting)
    return decoded


def test_store_decodes_on_demand_under_the_same_key(tmp_path, monkeypatch):
    paths = [write_image(tmp_path / "data" / f"img_{i}.png", seed=i, size=12) for i in range(6)]
    items = [Item(str(path), i % 2, f"c{i % 2}", split="test") for i, path in enumerate(paths)]
    decoded = count_decoded(monkeypatch)
    one_off = ImageStore(items, 8, tmp_path / "cache", decode_all=False)
    one_off.load(items[1:3])
    assert sorted(decoded) == sorted(item.path for item in items[1:3])
    assert one_off.rows.states(np.arange(6)).tolist() == [0, 1, 1, 0, 0, 0]
    sweep = ImageStore(items, 8, tmp_path / "cache")  # decode_all: the sweep's store
    assert sweep.key == one_off.key  # the cache key does not depend on how it is filled
    decoded.clear()
    sweep.load([items[0]])
    assert sorted(decoded) == sorted(item.path for i, item in enumerate(items) if i not in (1, 2))


def test_a_one_cell_command_decodes_only_the_images_it_uses(tmp_path, fast_opts, monkeypatch):
    opts = [*fast_opts, "CACHE_DIR", str(tmp_path / "cache")]  # a cold store
    cfg = build_config(ZEROSHOT, SYNTHETIC, opts)
    dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
    split = build_split(dataset, cfg)
    used_items = [*split.train, *split.val, *split.test, *sum(split.targets.values(), [])]
    used = {item.path for item in used_items}
    sweep_items = compute_store_items(dataset.items, used_items)  # what a sweep's store decodes
    decoded = count_decoded(monkeypatch)
    (result,) = run_cells([Cell(SYNTHETIC, ZEROSHOT, tuple(opts))])
    assert result["status"] == "complete", result.get("error")
    assert sorted(decoded) == sorted(used)  # each used image once, and nothing else
    assert len(used) < len(sweep_items)
