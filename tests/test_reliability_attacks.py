"""Attacks on what the toolkit reads back: no file content runs code, damage is never data."""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewclip.backbones import read_state_dict
from fewclip.config import build_config
from fewclip.distillation import load_teacher_file
from fewclip.features import load_or_compute_features
from fewclip.run import execute_run
from fewclip.samplers import SAMPLERS
from fewclip.stores import _STATE_OFFSET, FAILED, RowStore, read_npy_header
from fewclip.training_state import (
    MAGIC,
    BatchStream,
    decode_plain,
    encode_plain,
    load_training_state,
)
from fewclip_datasets.synthetic import generate_synthetic


class Payload:
    """Unpickling this creates the file `target`: proof that loading ran code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


def pickle_files(tmp_path: Path) -> dict[str, bytes]:
    """The payload as a plain pickle, a torch.save zip archive and an .npz object array."""
    target = tmp_path / "ran"
    raw = pickle.dumps({"config_hash": "abc", "x": Payload(target)})
    assert pickle.loads(raw) and target.exists()  # the payload is live
    target.unlink()
    archive, npz = tmp_path / "archive.pt", tmp_path / "object.npz"
    torch.save({"config_hash": "abc", "x": Payload(target)}, archive)
    np.savez(npz, logits=np.array([Payload(target)], dtype=object), class_names=np.array(["a"]))
    assert not target.exists()
    return {"pickle": raw, "torch.save": archive.read_bytes(), "npz": npz.read_bytes()}


def compute_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(12, dtype=np.float32).reshape(4, 3)[rows], rows >= 0


def one_warning(caplog, path: Path) -> None:
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and str(path) in messages[0] and "\n" not in messages[0], messages
    caplog.clear()


def test_a_pickle_payload_in_any_file_read_back_is_refused_without_running(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    target = tmp_path / "ran"
    for kind, content in pickle_files(tmp_path).items():
        state = tmp_path / f"{kind}-training_state.pt"
        state.write_bytes(content)
        assert load_training_state(state, "abc") is None
        one_warning(caplog, state)
        digest = hashlib.sha256(content).hexdigest().encode()  # a valid header, pickle body
        state.write_bytes(MAGIC + b"abc\n" + digest + b"\n" + content)
        assert load_training_state(state, "abc") is None
        one_warning(caplog, state)
        cache = tmp_path / f"{kind}-cache"
        (cache / "features").mkdir(parents=True)
        (cache / "features" / "key.npz").write_bytes(content)
        features = load_or_compute_features(cache, "key", lambda: torch.ones(2, 3))
        assert torch.equal(features, torch.ones(2, 3))  # rebuilt, not read
        one_warning(caplog, cache / "features" / "key.npz")
        rows = np.arange(4)
        RowStore(cache / "rows", "k", 4, np.float32).fill([rows], compute_rows)
        for name in ("data.npy", "state.npy"):  # a store's arrays: never unpickled
            (cache / "rows" / "k" / name).write_bytes(content)
            store = RowStore(cache / "rows", "k", 4, np.float32)
            store.fill([rows], compute_rows)
            assert np.array_equal(store.read(rows), compute_rows(rows)[0])
            one_warning(caplog, cache / "rows" / "k")
        for suffix, reader in ((".pt", read_state_dict), (".npz", load_teacher_file)):
            path = tmp_path / f"{kind}-file{suffix}"
            path.write_bytes(content)
            with pytest.raises(ValueError, match=str(path)) as error:
                reader(path)
            assert "\n" not in str(error.value)
        assert not target.exists(), kind


def test_training_state_codec_round_trips_every_kind_exactly():
    labels = np.arange(9) % 3
    sampler = SAMPLERS.get("difficulty")(labels, torch.Generator().manual_seed(1), None)
    stream = BatchStream(sampler, 4)
    next(stream)
    sampler.update(np.arange(4), np.linspace(0.1, 0.9, 4))
    payload = {
        "batches": stream.state_dict(),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.999)},
        "best": {"score": -float("inf"), "state": None, "step": 0},
        "scalar": np.float64(1 / 3),
    }
    tensors: dict[str, torch.Tensor] = {}
    decoded = decode_plain(encode_plain(payload, tensors), tensors)
    assert decoded["optimizer"]["state"][0]["step"].item() == 3.0
    assert decoded["optimizer"]["betas"] == (0.9, 0.999) and decoded["best"] == payload["best"]
    assert type(decoded["scalar"]) is np.float64 and decoded["scalar"] == payload["scalar"]
    for key, value in payload["batches"]["sampler"].items():
        got = decoded["batches"]["sampler"][key]
        assert type(got) is type(value) and getattr(got, "dtype", None) == getattr(
            value, "dtype", None
        ), key
        np.testing.assert_equal(got, value)
    with pytest.raises(TypeError, match="Payload"):
        encode_plain({"x": Payload(Path("unused"))}, {})


# ----- damaged caches: detected, reported by name, rebuilt; metrics as with a fresh cache ------
def _row_region(path: Path) -> tuple[int, int]:
    """(offset, row bytes) of an .npy file's rows."""
    shape, dtype, offset = read_npy_header(path)
    return offset, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def random_bytes(path: Path, folder: Path) -> None:
    offset, _ = _row_region(path)
    data = bytearray(path.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    middle = offset + (len(data) - offset) // 2
    data[middle : middle + 64] = noise
    path.write_bytes(bytes(data))


def truncation(path: Path, folder: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def permuted_rows(path: Path, folder: Path) -> None:
    offset, row_bytes = _row_region(path)
    data = bytearray(path.read_bytes())
    rows = [data[offset + i * row_bytes : offset + (i + 1) * row_bytes] for i in range(4)]
    for i, row in enumerate(rows[::-1]):  # rows 0-3 in reverse order
        data[offset + i * row_bytes : offset + (i + 1) * row_bytes] = row
    path.write_bytes(bytes(data))


def foreign_file(path: Path, folder: Path) -> None:
    """The same file of another store (another key) put under this store's name."""
    clean = folder.parent.parent.parent / "clean"  # the undamaged copy of the cache
    others = [p for p in clean.glob("*/*/data.npy") if p.parent.name != folder.name]
    for name in ("data.npy", "state.npy", "checks.npy", "header.json"):
        shutil.copy(others[0].parent / name, folder / name)


def failed_states(path: Path, folder: Path) -> None:
    state = folder / "state.npy"
    data = bytearray(state.read_bytes())
    data[_STATE_OFFSET : _STATE_OFFSET + 20] = bytes([FAILED] * 10 + [0] * 10)
    state.write_bytes(bytes(data))


def damage_feature_file(path: Path, kind: str) -> None:
    if kind == "permuted rows" or kind == "foreign file":
        with np.load(path) as data:
            arrays = dict(data)
        if kind == "permuted rows":
            arrays["features"] = arrays["features"][::-1].copy()
        else:
            arrays["key"] = np.array("another-key")
        np.savez(path, **arrays)
    elif kind == "truncation":
        truncation(path, path.parent)
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
        path.write_bytes(bytes(data))


DAMAGE = {
    "random bytes": random_bytes,
    "truncation": truncation,
    "permuted rows": permuted_rows,
    "foreign file": foreign_file,
    "failed states": failed_states,
}


@pytest.mark.slow
def test_damaged_caches_are_reported_rebuilt_and_change_no_metric(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    root = tmp_path / "data"
    generate_synthetic(root, 10, 48, ["center_a", "center_b"], 0)
    common = ["DATASET.ROOT", str(root), "DATASET.SYNTHETIC.CENTERS", "center_a,center_b"]
    common += ["DATASET.TARGET_CENTERS", "center_b", "DATASET.NUM_SHOTS", "2"]
    common += ["OPTIM.MAX_ITERS", "2", "EVAL.BATCH_SIZE", "16", "SEED", "1"]

    def run(recipe: str, cache: Path | str, output: str) -> dict:
        opts = [*common, "CACHE_DIR", str(cache), "OUTPUT_DIR", str(tmp_path / output)]
        cfg = build_config(
            f"configs/trainers/{recipe}.yaml", "configs/datasets/synthetic.yaml", opts
        )
        result = execute_run(cfg)
        assert result["status"] == "complete", result.get("traceback")
        return result["metrics"]

    recipes = ("linear_probe", "clip_lora")
    expected = {recipe: run(recipe, tmp_path / "clean", f"clean-{recipe}") for recipe in recipes}
    for recipe in recipes:  # a cache changes no result
        assert run(recipe, "", f"uncached-{recipe}") == expected[recipe]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead = finished.stdout.strip()  # the pid of a worker that is gone
    for name, damage in DAMAGE.items():
        cache = tmp_path / name.replace(" ", "-")
        shutil.copytree(tmp_path / "clean", cache)
        damaged = sorted(cache.glob("*/*/data.npy"))
        assert {p.parent.parent.name for p in damaged} == {"images", "features"}
        for path in damaged:
            damage(path, path.parent)
        feature_files = sorted((cache / "features").glob("*.npz"))
        for path in feature_files:
            damage_feature_file(path, name)
        (cache / "images" / f".{damaged[-1].parent.name}.{dead}.0123abcd.tmp").mkdir()
        (cache / "features" / f".key.npz.{dead}.0123abcd.tmp").write_bytes(b"half")
        caplog.clear()
        for recipe in recipes:
            assert run(recipe, cache, f"{name}-{recipe}") == expected[recipe], name
        messages = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        for path in [*damaged, *feature_files]:
            named = str(path) if path.suffix == ".npz" else str(path.parent)
            assert any(named in message for message in messages), (name, path, messages)
        assert all("\n" not in message for message in messages)
        assert not list(cache.glob("*/.*.tmp"))
