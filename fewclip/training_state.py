"""The resumable training state of one run: the batch stream and the state file's I/O.

The training state (`training_state.pt` in the run folder, every CHECKPOINT.EVERY steps) holds
what the next step depends on: trainable tensors, optimizer, the batch stream (sampler attributes,
leftover indices), the seeded generator and torch's RNG, the best-validation state and history.
It is written atomically with a SHA-256 of its body, so a half-written or corrupted file is
detected and ignored (training restarts from step 0), as is one written under another config.
The hook that saves and restores it during `fit` is `fewclip.hooks.TrainingStateHook`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewclip.images import write_atomic_bytes
from fewclip.samplers import SamplerBase

LOGGER = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"
MAGIC = b"FEWCLIP-TRAINING-STATE-1\n"
_NOT_SAMPLER_STATE = ("labels", "generator", "cfg")  # rebuilt from the run, not saved


class BatchStream:
    """Endless stream of index batches from a sampler, with a state that can be saved.

    Leftovers of one epoch are topped up from the next, so every batch has `batch_size` items.
    """

    def __init__(self, sampler: SamplerBase, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.buffer = np.zeros(0, dtype=np.int64)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> np.ndarray:
        while len(self.buffer) < self.batch_size:
            epoch = self.sampler.epoch_indices().astype(np.int64)
            self.buffer = np.concatenate([self.buffer, epoch])
        batch, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, Any]:
        sampler = {k: v for k, v in vars(self.sampler).items() if k not in _NOT_SAMPLER_STATE}
        return {"buffer": self.buffer.copy(), "sampler": sampler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = np.asarray(state["buffer"], dtype=np.int64)
        for key, value in state["sampler"].items():
            setattr(self.sampler, key, value)


def save_training_state(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write MAGIC + sha256 hex of the body + newline + torch.save(payload)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    write_atomic_bytes(Path(path), MAGIC + digest + b"\n" + body)


def load_training_state(path: str | Path, config_hash: str) -> dict[str, Any] | None:
    """The saved payload, or None when absent, truncated, corrupted or from another config."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    header_end = len(MAGIC) + 64
    body = data[header_end + 1 :]
    digest = data[len(MAGIC) : header_end].decode(errors="replace")
    if not data.startswith(MAGIC) or hashlib.sha256(body).hexdigest() != digest:
        LOGGER.warning("ignoring incomplete or corrupted training state %s", path)
        return None
    # weights_only=False: the body holds numpy sampler state; its hash was checked above.
    payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    if payload.get("config_hash") != config_hash:
        LOGGER.warning("ignoring training state %s written under another config", path)
        return None
    return payload


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
