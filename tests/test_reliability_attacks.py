"""Attacks on what the toolkit reads back: no file content runs code, damage is never data."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fewclip.backbones import read_state_dict
from fewclip.distillation import load_teacher_file
from fewclip.features import load_or_compute_features
from fewclip.samplers import SAMPLERS
from fewclip.training_state import (
    MAGIC,
    BatchStream,
    decode_plain,
    encode_plain,
    load_training_state,
)


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
