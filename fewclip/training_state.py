"""The resumable training state of one run: the batch stream and the state file's I/O.

The training state (`training_state.pt` in the run folder, every CHECKPOINT.EVERY steps) holds
what the next step depends on: trainable tensors, optimizer, the batch stream (sampler attributes,
leftover indices), the seeded generator and torch's RNG, the best-validation state and history.
It is written atomically as safetensors (tensors) + JSON (the rest), never pickle, with the
config hash and a SHA-256 of its body in a header: a half-written, corrupted or foreign file, or
one written under another config, is ignored with one warning (training restarts from step 0).
The hook that saves and restores it during `fit` is `fewclip.hooks.TrainingStateHook`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fewclip.files import write_atomic_bytes
from fewclip.samplers import SamplerBase

LOGGER = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"
MAGIC = b"FEWCLIP-TRAINING-STATE-2\n"
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


def encode_plain(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `value`; its tensors and numpy arrays move into `tensors` by name.

    Dicts (any key type), tuples, numpy arrays and numpy scalars are tagged so `decode_plain`
    rebuilds them exactly; anything else that is not a JSON scalar is refused (TypeError).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode_plain(item, tensors) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_plain(item, tensors) for item in value]}
    if isinstance(value, dict):
        items = value.items()
        return {
            "__dict__": [[encode_plain(k, tensors), encode_plain(v, tensors)] for k, v in items]
        }
    for tag, kind, convert in _ARRAY_KINDS:
        if isinstance(value, kind):
            name = f"t{len(tensors)}"
            tensors[name] = convert(value).detach().cpu().contiguous().clone()
            return {tag: name}
    raise TypeError(f"training state cannot hold a {type(value).__name__}")


_ARRAY_KINDS = (
    ("__tensor__", torch.Tensor, lambda value: value),
    ("__ndarray__", np.ndarray, lambda value: torch.from_numpy(np.ascontiguousarray(value))),
    ("__npscalar__", np.generic, lambda value: torch.from_numpy(np.asarray(value))),
)


def decode_plain(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_plain`; a tag it does not know raises ValueError."""
    if isinstance(value, list):
        return [decode_plain(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    tag, inner = next(iter(value.items())) if len(value) == 1 else (None, None)
    if tag == "__tuple__":
        return tuple(decode_plain(item, tensors) for item in inner)
    if tag == "__dict__":
        return {decode_plain(k, tensors): decode_plain(v, tensors) for k, v in inner}
    if tag == "__tensor__":
        return tensors[inner]
    if tag == "__ndarray__":
        return tensors[inner].numpy()
    if tag == "__npscalar__":
        return tensors[inner].numpy()[()]
    raise ValueError(f"unknown entry {sorted(value)[:3]} in the training state")


def save_training_state(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically write MAGIC + config hash + sha256 of the body + the body: a safetensors file of
    the payload's tensors whose metadata holds the rest as JSON (no pickle: loading runs no code).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(encode_plain(payload, tensors))
    body = save_safetensors(tensors, metadata={"structure": structure})
    digest = hashlib.sha256(body).hexdigest().encode()
    config_hash = str(payload["config_hash"]).encode()
    write_atomic_bytes(Path(path), MAGIC + config_hash + b"\n" + digest + b"\n" + body)


def load_training_state(path: str | Path, config_hash: str) -> dict[str, Any] | None:
    """The saved payload, or None (one warning naming the file) when absent, truncated, corrupted,
    from another config, or not a fewclip training state at all (e.g. a pickle: never unpickled).

    The config hash in the header is checked before the body is parsed; the body is safetensors
    and JSON only, so no file content can run code.
    """
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        LOGGER.warning("ignoring %s: not a fewclip training state; training starts at step 0", path)
        return None
    saved_hash, digest, body = (data[len(MAGIC) :].split(b"\n", 2) + [b"", b""])[:3]
    if saved_hash.decode(errors="replace") != config_hash:
        LOGGER.warning("ignoring training state %s written under another config", path)
        return None
    if hashlib.sha256(body).hexdigest().encode() != digest:
        LOGGER.warning("ignoring incomplete or corrupted training state %s", path)
        return None
    try:
        header_size = int.from_bytes(body[:8], "little")
        structure = json.loads(body[8 : 8 + header_size])["__metadata__"]["structure"]
        return decode_plain(json.loads(structure), load_safetensors(body))
    except (ValueError, KeyError, TypeError, SafetensorError) as error:
        LOGGER.warning("ignoring unreadable training state %s (%s)", path, error)
        return None


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
