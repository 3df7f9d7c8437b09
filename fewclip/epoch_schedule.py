"""Epoch-based training of the Dassl.pytorch line (CoOp, CoCoOp, KgCoOp, CLIP-Adapter, CLAP): SGD,
a number of epochs that depends on the shots, one constant warm-up epoch, then cosine.

fewclip's loop counts iterations, so the epochs become iterations here: Dassl drops the last
short batch when the training set holds at least one batch (dassl/data/data_manager.py:43), so an
epoch is floor(N / B) iterations, or 1 when N < B. A trainer using these keys overrides
`num_iterations`, `num_warmup_iterations` and `build_optimizer` through `DasslSchedule`; a trainer
with a loop of its own (CLAP) steps the lr once per epoch as Dassl does (`compute_dassl_epoch_lr`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from yacs.config import CfgNode


def add_epoch_keys(node: CfgNode, shots: list[int], epochs: list[int]) -> CfgNode:
    """The epoch keys of a trainer node (CoOp's configs as defaults where the caller gives them)."""
    node.EPOCH_SHOTS = list(shots)  # shot counts of the EPOCHS table
    node.EPOCHS = list(epochs)  # epochs for those shot counts (the first listed >= NUM_SHOTS)
    node.WARMUP_EPOCHS = 1  # warm-up epochs at OPTIM.WARMUP_CONSTANT_LR (Dassl WARMUP_EPOCH)
    node.MOMENTUM = 0.9  # SGD momentum (Dassl OPTIM.MOMENTUM)
    return node


def epochs_for_shots(shots_table: list[int], epochs_table: list[int], shots: int) -> int:
    """Epochs of the first listed shot count >= `shots` (the last entry beyond the table)."""
    if len(shots_table) != len(epochs_table) or not shots_table:
        raise ValueError(
            f"EPOCH_SHOTS {shots_table} and EPOCHS {epochs_table} must be non-empty lists of "
            "the same length"
        )
    for listed, epochs in sorted(zip(shots_table, epochs_table)):
        if listed >= shots:
            return epochs
    return sorted(zip(shots_table, epochs_table))[-1][1]


def iterations_per_epoch(num_train: int, batch_size: int) -> int:
    """Dassl's batches per epoch: floor(N / B) with drop_last when N >= B, else 1."""
    return max(1, num_train // batch_size) if num_train >= batch_size else 1


def epoch_iterations(node: CfgNode, optim: CfgNode, num_train: int, shots: int) -> int:
    """Total iterations: OPTIM.MAX_ITERS if set, else epochs(shots) x iterations per epoch."""
    if optim.MAX_ITERS:
        return optim.MAX_ITERS
    epochs = epochs_for_shots(list(node.EPOCH_SHOTS), list(node.EPOCHS), shots)
    return epochs * iterations_per_epoch(num_train, optim.BATCH_SIZE)


def warmup_iterations(node: CfgNode, optim: CfgNode, num_train: int, total: int) -> int:
    """WARMUP_EPOCHS epochs of iterations, at most all but one of `total`."""
    steps = node.WARMUP_EPOCHS * iterations_per_epoch(num_train, optim.BATCH_SIZE)
    return min(steps, max(0, total - 1))


def compute_dassl_epoch_lr(
    epoch: int, lr: float, max_epoch: int, warmup_epochs: int, warmup_lr: float, min_lr: float
) -> float:
    """The lr of 0-based `epoch` under Dassl's cosine schedule with a constant warm-up, stepped
    once per epoch (dassl/optim/lr_scheduler.py:35-54, :128-141, WARMUP_RECOUNT True): `warmup_lr`
    for the first `warmup_epochs` epochs, then min_lr + (lr - min_lr) (1 + cos(pi e / max_epoch))
    / 2 with e counted from the end of the warm-up (so the last epoch stays above min_lr)."""
    if epoch < warmup_epochs:
        return warmup_lr
    progress = (epoch - warmup_epochs) / max_epoch
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_sgd(
    named: list[tuple[str, nn.Parameter]], optim: CfgNode, momentum: float
) -> torch.optim.Optimizer:
    """SGD(lr, momentum, weight decay on every parameter), as Dassl's build_optimizer
    (dassl/optim/optimizer.py:105-113; dampening 0, no Nesterov)."""
    params = list({id(p): p for _, p in named}.values())
    return torch.optim.SGD(params, lr=optim.LR, momentum=momentum, weight_decay=optim.WEIGHT_DECAY)


class DasslSchedule:
    """The three TrainerBase methods of an epoch-based recipe, for a trainer whose node has the
    keys of `add_epoch_keys` and MOMENTUM and whose `prepare` sets `num_train` (the training
    set's size). It goes before TrainerBase: `class CoOp(DasslSchedule, TrainerBase)`."""

    num_train = 0

    def num_iterations(self) -> int:
        return epoch_iterations(
            self.node, self.cfg.OPTIM, self.num_train, self.cfg.DATASET.NUM_SHOTS
        )

    def num_warmup_iterations(self, total: int) -> int:
        return warmup_iterations(self.node, self.cfg.OPTIM, self.num_train, total)

    def build_optimizer(self, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return build_sgd(named, self.cfg.OPTIM, self.node.MOMENTUM)
