"""Training-loop hooks that are not the method's business: resumable training state, TensorBoard.

The training state (`training_state.pt` in the run folder, every CHECKPOINT.EVERY steps) holds
what the next step depends on: trainable tensors, optimizer, the batch stream (sampler attributes,
leftover indices), the seeded generator and torch's RNG, the best-validation state and history.
It is written atomically with a SHA-256 of its body, so a half-written or corrupted file is
detected and ignored (training restarts from step 0), as is one written under another config.
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


class ScalarLog:
    """TensorBoard scalars of one run: losses and learning rate per step, validation score.

    torch.utils.tensorboard is imported only here, when cfg.TENSORBOARD is on.
    """

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_step(self, step: int, losses: dict[str, torch.Tensor], lr: float) -> None:
        total = 0.0
        for name, value in losses.items():
            value = float(value.detach() if isinstance(value, torch.Tensor) else value)
            total += value
            self.writer.add_scalar(f"loss/{name}", value, step)
        self.writer.add_scalar("loss/total", total, step)
        self.writer.add_scalar("lr", lr, step)

    def log_validation(self, step: int, score: float) -> None:
        self.writer.add_scalar("val/score", score, step)  # EVAL.SELECT criterion

    def close(self) -> None:
        self.writer.close()


def training_state_path(trainer: Any) -> Path | None:
    """<run dir>/training_state.pt when the run set `trainer.run_dir` and CHECKPOINT.EVERY > 0."""
    if getattr(trainer, "run_dir", None) is None or trainer.cfg.CHECKPOINT.EVERY <= 0:
        return None
    return Path(trainer.run_dir) / STATE_FILE


def _config_hash(trainer: Any) -> str:
    from fewclip.run import compute_config_hash  # run imports the trainer module

    return compute_config_hash(trainer.cfg)


def save_training(
    trainer: Any, step: int, optimizer: torch.optim.Optimizer, batches: BatchStream, extra: dict
) -> None:
    """Write the training state after `step` steps if a checkpoint is due (rank 0 only)."""
    from fewclip.distributed import is_main_process

    path = training_state_path(trainer)
    if path is None or step % trainer.cfg.CHECKPOINT.EVERY or not is_main_process():
        return
    payload = {
        "config_hash": _config_hash(trainer),
        "step": step,
        "trainable": trainer.checkpoint_state(),
        "optimizer": optimizer.state_dict(),
        "batches": batches.state_dict(),
        "generator": trainer.generator.get_state(),
        "rng": capture_rng(),
        **extra,
    }
    save_training_state(path, payload)


def resume_training(
    trainer: Any, optimizer: torch.optim.Optimizer, batches: BatchStream
) -> dict[str, Any] | None:
    """Restore the last valid training state into the trainer; returns it (None: start at 0)."""
    path = training_state_path(trainer)
    payload = load_training_state(path, _config_hash(trainer)) if path is not None else None
    if payload is None:
        return None
    trainer.load_checkpoint_state(payload["trainable"])
    optimizer.load_state_dict(payload["optimizer"])
    batches.load_state_dict(payload["batches"])
    trainer.generator.set_state(payload["generator"])
    restore_rng(payload["rng"])
    LOGGER.info("resuming %s from step %d", path.parent, payload["step"])
    return payload


def finish_training(trainer: Any) -> None:
    """Training reached its last step: the training state is no longer needed."""
    from fewclip.distributed import is_main_process

    path = training_state_path(trainer)
    if path is not None and is_main_process():
        path.unlink(missing_ok=True)


def open_scalar_log(trainer: Any) -> ScalarLog | None:
    """A TensorBoard log in <run dir>/tensorboard when cfg.TENSORBOARD is on (rank 0 only)."""
    from fewclip.distributed import is_main_process

    if not trainer.cfg.TENSORBOARD or getattr(trainer, "run_dir", None) is None:
        return None
    return ScalarLog(Path(trainer.run_dir) / "tensorboard") if is_main_process() else None
