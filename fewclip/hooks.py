"""The hooks of the training loop: everything around the step that is not the method's business.

`TrainerBase.fit` owns the step (batch -> losses -> backward -> optimizer step); the hooks here
own the rest, each at the points it needs, in the order `build_hooks` lists them:

    on_fit_start   resume from the training state, join the process group, open the logs
    before_step    the learning rate of this step
    before_forward torchrun: keep this process's part of the global batch
    after_forward  torchrun: the global loss of the step (for the divergence check)
    after_backward torchrun: average the gradients over processes
    after_step     early stopping, sampler feedback, logs, validation and selection, the state
    on_fit_end     close the logs, drop the training state, select the weights, report

A hook reads and writes the shared `FitContext`; the loop never branches on what a hook does.
The resumable state itself (file format, batch stream) is in fewclip/training_state.py.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewclip import distributed
from fewclip.config import compute_config_hash
from fewclip.training_state import (
    STATE_FILE,
    BatchStream,
    capture_rng,
    load_training_state,
    restore_rng,
    save_training_state,
)

LOGGER = logging.getLogger(__name__)


@dataclass
class FitContext:
    """What the loop and its hooks share during one `fit`."""

    trainer: Any  # the TrainerBase being trained
    train: Any  # the training ImageSet
    val: Any  # the validation ImageSet, or None
    evaluate_fn: Any  # (trainer, ImageSet) -> validation score, or None
    optimizer: torch.optim.Optimizer
    batches: BatchStream
    params: list[torch.nn.Parameter]
    total: int  # number of steps
    epoch_steps: int = 1  # steps of one pass over the training set, ceil(N / batch)
    first_step: int = 0  # > 0 when resumed from a training state
    step: int = 0  # the current step (0-based)
    images: torch.Tensor | None = None  # the step's (B, 3, H, W) input, this process's part
    labels: torch.Tensor | None = None  # (B,) labels of `images`
    indices: np.ndarray | None = None  # training-set rows of `images`
    global_size: int = 0  # rows of the global batch (all processes)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None  # sum of `losses` (this process)
    global_loss: torch.Tensor | None = None  # the loss of the global batch
    best: dict[str, Any] = field(
        default_factory=lambda: {"score": -math.inf, "state": None, "step": None}
    )
    history: list[dict[str, Any]] = field(default_factory=list)
    # OPTIM.EARLY_STOP_EPOCHS: the best epoch-mean loss (None: no epoch yet), epochs since it,
    # and the loss summed over the current epoch's steps
    early_stop: dict[str, Any] = field(
        default_factory=lambda: {"best": None, "stale": 0, "sum": 0.0}
    )
    stop: bool = False  # set by a hook in after_step: this step is the last

    @property
    def last(self) -> bool:
        return self.step == self.total - 1 or self.stop


class Hook:
    """A no-op at every point; subclasses override the points they need."""

    def on_fit_start(self, ctx: FitContext) -> None: ...

    def before_step(self, ctx: FitContext) -> None: ...

    def before_forward(self, ctx: FitContext) -> None: ...

    def after_forward(self, ctx: FitContext) -> None: ...

    def after_backward(self, ctx: FitContext) -> None: ...

    def after_step(self, ctx: FitContext) -> None: ...

    def on_fit_end(self, ctx: FitContext, report: dict[str, Any]) -> None: ...


def compute_lr_factor(step: int, warmup: int, min_ratio: float, period: int) -> float:
    """Linear warm-up, then cosine from 1 to `min_ratio` over `period` steps (per iteration).

    The cosine reaches `min_ratio` `period` steps past the warm-up (the trainer's
    `num_cosine_iterations`: by default the rest of the run) and, in a longer run, rises again
    along the same cosine: torch's CosineAnnealingLR with T_max = period, whose closed form its
    recursive update follows past T_max too.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / period
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LearningRateHook(Hook):
    """OPTIM.LR with a linear warm-up (OPTIM.WARMUP_ITERS steps, or OPTIM.WARMUP_FRACTION of
    all steps, or the trainer's `num_warmup_iterations`), then cosine down to OPTIM.MIN_LR.
    OPTIM.WARMUP_CONSTANT_LR > 0 holds that lr during the warm-up instead of the ramp."""

    def before_step(self, ctx: FitContext) -> None:
        optim = ctx.trainer.cfg.OPTIM
        min_ratio = optim.MIN_LR / optim.LR if optim.LR > 0 else 0.0
        warmup = ctx.trainer.num_warmup_iterations(ctx.total)
        period = ctx.trainer.num_cosine_iterations(ctx.total, warmup)
        lr = optim.LR * compute_lr_factor(ctx.step, warmup, min_ratio, period)
        if ctx.step < warmup and optim.WARMUP_CONSTANT_LR > 0:
            lr = optim.WARMUP_CONSTANT_LR
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr


class EarlyStopHook(Hook):
    """OPTIM.EARLY_STOP_EPOCHS > 0: after each epoch (`epoch_steps` steps) compare its mean
    training loss with the best so far; once that many epochs in a row have not fallen below the
    best, this step is the last (CervixFM downstream/utils/train.py:141-166). The loss is the
    global one, so every torchrun process stops at the same step. Runs first in after_step, so
    validation and the training state see `ctx.last`."""

    def after_step(self, ctx: FitContext) -> None:
        patience = ctx.trainer.cfg.OPTIM.EARLY_STOP_EPOCHS
        if not patience:
            return
        state = ctx.early_stop
        state["sum"] += float(ctx.global_loss.detach())
        if (ctx.step + 1) % ctx.epoch_steps:
            return
        mean = state["sum"] / ctx.epoch_steps
        state["sum"] = 0.0
        if state["best"] is None or mean < state["best"]:
            state["best"], state["stale"] = mean, 0
            return
        state["stale"] += 1
        if state["stale"] >= patience and not ctx.last:
            ctx.stop = True
            LOGGER.info(
                "early stop after step %d: the epoch-mean training loss has not improved on "
                "%.6g for %d epochs (OPTIM.EARLY_STOP_EPOCHS)",
                ctx.step + 1,
                state["best"],
                patience,
            )


class DistributedHook(Hook):
    """torchrun: equal start, each process its part of the global batch, averaged gradients.

    Outside torchrun every call is the identity (one process holds the whole batch).
    """

    def on_fit_start(self, ctx: FitContext) -> None:
        distributed.broadcast_parameters(ctx.params)  # after a resume: every process starts equal

    def before_forward(self, ctx: FitContext) -> None:
        ctx.global_size = len(ctx.indices)
        ctx.images, ctx.labels, ctx.indices = distributed.shard_batch(
            ctx.images, ctx.labels, ctx.indices
        )

    def after_forward(self, ctx: FitContext) -> None:
        ctx.global_loss = distributed.reduce_loss(ctx.loss, len(ctx.indices), ctx.global_size)

    def after_backward(self, ctx: FitContext) -> None:
        distributed.average_gradients(ctx.params, len(ctx.indices), ctx.global_size)


class SamplerFeedbackHook(Hook):
    """Samplers that learn from training (difficulty) hear p(true class) of every batch."""

    def after_step(self, ctx: FitContext) -> None:
        trainer, sampler = ctx.trainer, ctx.batches.sampler
        if trainer.batch_logits is not None:
            with torch.no_grad():
                probabilities = torch.softmax(trainer.batch_logits.detach().float(), dim=-1)
                true_class = probabilities.gather(1, ctx.labels[:, None]).squeeze(1)
            # torchrun: every process's sampler hears the whole global batch, so they stay equal
            sampler.update(
                distributed.gather_concatenated(np.asarray(ctx.indices)),
                distributed.gather_concatenated(true_class.cpu().numpy()),
            )
        elif getattr(sampler, "needs_feedback", False):
            raise RuntimeError(
                f"sampler {trainer.node.SAMPLER!r} needs the batch logits, but "
                f"{type(trainer).__name__}.compute_losses does not set self.batch_logits"
            )

    def on_fit_end(self, ctx: FitContext, report: dict[str, Any]) -> None:
        if ctx.batches.sampler.state():
            ctx.trainer.report["sampler"] = ctx.batches.sampler.state()


class ValidationHook(Hook):
    """Validation every EVAL.VAL_EVERY steps and at the last; EVAL.SELECT picks the weights.

    Validation data only: the test set is never seen here.
    """

    def after_step(self, ctx: FitContext) -> None:
        every = ctx.trainer.cfg.EVAL.VAL_EVERY
        if ctx.val is None or ctx.evaluate_fn is None:
            return
        if not (ctx.last or (every and (ctx.step + 1) % every == 0)):
            return
        score = ctx.evaluate_fn(ctx.trainer, ctx.val)  # eval mode, then back to train mode
        ctx.history.append(
            {"step": ctx.step + 1, "val_score": score, "loss": float(ctx.global_loss)}
        )
        if score > ctx.best["score"]:
            state = copy.deepcopy(ctx.trainer.checkpoint_state())
            ctx.best = {"score": score, "state": state, "step": ctx.step + 1}

    def on_fit_end(self, ctx: FitContext, report: dict[str, Any]) -> None:
        select_best = ctx.trainer.cfg.EVAL.SELECT == "best_val"
        if select_best and ctx.best["state"] is not None:
            ctx.trainer.load_checkpoint_state(ctx.best["state"])
        report["val_history"] = ctx.history
        report["selected_step"] = ctx.best["step"] if select_best else ctx.total


class TrainingStateHook(Hook):
    """Resume from <run dir>/training_state.pt; save it every CHECKPOINT.EVERY steps (rank 0);
    delete it when training reaches its last step. Off without a run folder or with EVERY 0."""

    def __init__(self, run_dir: str | Path | None, every: int) -> None:
        self.path = Path(run_dir) / STATE_FILE if run_dir is not None and every > 0 else None
        self.every = every

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.path is None:
            return
        trainer = ctx.trainer
        payload = load_training_state(self.path, compute_config_hash(trainer.cfg))
        if payload is None:
            return
        trainer.load_checkpoint_state(payload["trainable"])
        ctx.optimizer.load_state_dict(payload["optimizer"])
        ctx.batches.load_state_dict(payload["batches"])
        trainer.generator.set_state(payload["generator"])
        restore_rng(payload["rng"])
        ctx.first_step, ctx.best, ctx.history = payload["step"], payload["best"], payload["history"]
        ctx.early_stop = payload.get("early_stop", ctx.early_stop)
        LOGGER.info("resuming %s from step %d", self.path.parent, ctx.first_step)

    def after_step(self, ctx: FitContext) -> None:
        step = ctx.step + 1
        if self.path is None or ctx.last or step % self.every or not distributed.is_main_process():
            return
        trainer = ctx.trainer
        payload = {
            "config_hash": compute_config_hash(trainer.cfg),
            "step": step,
            "trainable": trainer.checkpoint_state(),
            "optimizer": ctx.optimizer.state_dict(),
            "batches": ctx.batches.state_dict(),
            "generator": trainer.generator.get_state(),
            "rng": capture_rng(),
            "best": ctx.best,
            "history": ctx.history,
            "early_stop": ctx.early_stop,
        }
        save_training_state(self.path, payload)

    def on_fit_end(self, ctx: FitContext, report: dict[str, Any]) -> None:
        if self.path is not None and distributed.is_main_process():
            self.path.unlink(missing_ok=True)
        report["resumed_from_step"] = ctx.first_step
        report["stopped_early"] = ctx.stop


class ScalarLogHook(Hook):
    """Per-step losses (VERBOSE: to the log every 20 steps; TENSORBOARD: losses, LR and the
    validation score in <run dir>/tensorboard, rank 0 only). TensorBoard is imported only here,
    when it is on."""

    def __init__(self, run_dir: str | Path | None, tensorboard: bool, verbose: bool) -> None:
        self.log_dir = Path(run_dir) / "tensorboard" if tensorboard and run_dir else None
        self.verbose = verbose
        self.writer = None
        self.logged_validations = 0

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.log_dir is not None and distributed.is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.logged_validations = len(ctx.history)

    def after_step(self, ctx: FitContext) -> None:
        values = {name: float(value.detach()) for name, value in ctx.losses.items()}
        if self.verbose and ctx.step % 20 == 0:
            LOGGER.info("step %d %s", ctx.step, {k: round(v, 4) for k, v in values.items()})
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"loss/{name}", value, ctx.step)
        self.writer.add_scalar("loss/total", sum(values.values()), ctx.step)
        self.writer.add_scalar("lr", ctx.optimizer.param_groups[0]["lr"], ctx.step)
        for entry in ctx.history[self.logged_validations :]:  # EVAL.SELECT criterion
            self.writer.add_scalar("val/score", entry["val_score"], entry["step"])
        self.logged_validations = len(ctx.history)

    def on_fit_end(self, ctx: FitContext, report: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()


def build_hooks(trainer: Any) -> list[Hook]:
    """The loop's hooks, in the order they run at every point: the state is restored before the
    log opens and the processes synchronise, and saved after validation updated the best weights
    and history, so a resumed run continues exactly."""
    cfg = trainer.cfg
    return [
        LearningRateHook(),
        EarlyStopHook(),
        SamplerFeedbackHook(),
        ValidationHook(),
        TrainingStateHook(trainer.run_dir, cfg.CHECKPOINT.EVERY),
        ScalarLogHook(trainer.run_dir, cfg.TENSORBOARD, cfg.VERBOSE),
        DistributedHook(),
    ]
