"""Shared fixtures: a config rooted in a temporary folder, tiny generated image trees and the
model-family twins written to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from yacs.config import CfgNode

from fewclip.config import get_cfg_defaults
from fewclip.registry import DATASETS, load_installed_plugins
from fewclip.twins import write_hf_clip_twin, write_resnet_twin, write_timm_hf_twin

load_installed_plugins()  # the built-in datasets and trainers, as the fewclip command does

# seconds: turns a hang into a failure and never paces a test (wait on files, events, exits)
HANG_GUARD = 3600


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A small random RGB PNG (distinct pixels per seed, so files differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def write_oct_tree(root: Path, per_class: int, centers=("mixed", "huaxi", "xiangya")) -> Path:
    """The SAVLT cervical OCT layout, `<center>/images/<class>/<center>_<i>.png`, tiny images."""
    from fewclip_datasets.cervical_oct import CLASS_NAMES

    counter = 0
    for center in centers:
        for name in CLASS_NAMES:
            for index in range(per_class):
                counter += 1
                write_image(root / center / "images" / name / f"{center}_{index}.png", counter)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Callable[..., Path]:
    """`image_tree({"cls": 3})` -> root/cls/*.png; `image_tree({"center": {"cls": 3}})` nests."""

    def make(layout: dict, root: Path | None = None) -> Path:
        root = root or tmp_path / "data"
        counter = 0
        for name, value in layout.items():
            entries = value.items() if isinstance(value, dict) else [("", value)]
            for sub, count in entries:
                folder = root / name / sub if sub else root / name
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    counter += 1
                    write_image(folder / f"img_{index:03d}.png", seed=counter)
        return root

    return make


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., CfgNode]:
    """`make_cfg("ImageFolder", ROOT=...)`: defaults with outputs and caches under tmp_path,
    the dataset's own node attached, DATASET keys set from keyword arguments (not frozen)."""

    def make(dataset: str = "SyntheticMultiCenter", **dataset_keys) -> CfgNode:
        cfg = get_cfg_defaults()
        cfg.OUTPUT_DIR = str(tmp_path / "output")
        cfg.CACHE_DIR = str(tmp_path / "cache")
        cls = DATASETS.get(dataset)
        cfg.DATASET.NAME = cls.__name__
        if hasattr(cls, "config_node"):
            cfg.DATASET[cls.config_key()] = cls.config_node()
        for key, value in dataset_keys.items():
            cfg.DATASET[key] = value
        return cfg

    return make


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One CACHE_DIR for the session: the synthetic images are generated once for all tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def fast_opts(tmp_path: Path, shared_cache: Path) -> list[str]:
    """KEY VALUE opts for a run that takes a second on the tiny model."""
    return [
        "OUTPUT_DIR", str(tmp_path / "output"),
        "CACHE_DIR", str(shared_cache),
        "MODEL.NAME", "tiny-vit",
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
        "DATASET.NUM_SHOTS", "2",
        "DATASET.VAL_SHOTS", "2",
        "OPTIM.MAX_ITERS", "3",
        "OPTIM.BATCH_SIZE", "8",
        "EVAL.BATCH_SIZE", "64",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def timm_hf_twin(tmp_path_factory) -> Path:
    """BiomedCLIP's layout at toy size (fewclip.twins); read-only, shared by the session."""
    return write_timm_hf_twin(tmp_path_factory.mktemp("timm_hf_twin"))


@pytest.fixture(scope="session")
def hf_clip_twin(tmp_path_factory) -> Path:
    """A Hugging Face CLIPModel folder at toy size (PLIP's layout); read-only."""
    return write_hf_clip_twin(tmp_path_factory.mktemp("hf_clip_twin"))


@pytest.fixture(scope="session")
def resnet_twin(tmp_path_factory) -> Path:
    """An open_clip ResNet CLIP folder at toy size; read-only."""
    return write_resnet_twin(tmp_path_factory.mktemp("resnet_twin"))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one torch thread, above all on a shared, busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_command(args: list[str], output: Path) -> dict:
    """`python run_shell.py ARGS` as a user types it (a fresh process, from the repository);
    returns the one results.json it wrote under `output`. Waits on the process, not a clock."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "run_shell.py", *args]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = output.rglob("results.json")
    return json.loads(path.read_text())
