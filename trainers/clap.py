"""CLAP (Silva-Rodríguez, Hajimiri, Ben Ayed, Dolz, "A Closer Look at the Few-Shot Adaptation of
Large Vision-Language Models", CVPR 2024): CLass-Adaptive linear Probing.

A linear probe whose class prototypes w_c start at the zero-shot class text embeddings t_c (raw,
not normalised) and train by CE on s cos(f, w_c) plus a class-adaptive penalty keeping each
prototype near its zero-shot one, mean_c lambda_c ||w_c - t_c||^2, with lambda_c the mean
zero-shot softmax probability of class c on its own support samples: validation-free. Released
code: jusiro/CLAP trainers/adapters.py (ADAPTER, INIT ZS, CONSTRAINT l2) with
configs/trainers/SGD_lr1e-1_B256_ep300.yaml: 20 augmented views of every shot as samples, SGD
0.1, momentum 0.9, batch 256, 300 epochs, one constant warm-up epoch, cosine per epoch. Every
formula's source line is in docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.epoch_schedule import (
    add_epoch_keys,
    build_sgd,
    compute_dassl_epoch_lr,
    epoch_iterations,
    iterations_per_epoch,
)
from fewclip.families import image_feature_dim
from fewclip.feature_training import FeatureValidation, FeatureViews
from fewclip.registry import TRAINERS
from fewclip.trainer import DivergedError, ImageSet, TrainerBase

CONSTRAINTS = ("l2", "none")


def compute_prototype_logits(
    features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """s cos(f, w): features (N, D), prototypes (C, D), both normalised here -> (N, C)
    (adapters.py:343-354)."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).t()


def compute_zero_shot_penalty(
    prototypes: torch.Tensor, anchors: torch.Tensor, multipliers: torch.Tensor
) -> torch.Tensor:
    """mean_c lambda_c ||w_c - t_c||^2 (adapters.py:219-230, "l2"): prototypes, anchors (C, D),
    multipliers (C,) -> scalar. Its gradient in w_c is 2 lambda_c (w_c - t_c) / C."""
    return torch.mean(multipliers * (prototypes - anchors).pow(2).sum(dim=-1))


def compute_initial_multipliers(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """lambda_c = the mean zero-shot softmax probability of class c over the samples of class c
    (adapters.py:232-252: diag(softmax(logits)^T onehot) / class counts): logits (N, C), labels
    (N,) -> (C,). A class without samples gets 0 (the source divides by zero)."""
    one_hot = F.one_hot(labels, num_classes).float()
    true_class = (torch.softmax(logits.float(), dim=-1) * one_hot).sum(dim=0)
    return true_class / one_hot.sum(dim=0).clamp(min=1.0)


class ZeroShotPrototypes(nn.Module):
    """prototypes (C, D), trained; anchors t (C, D) and multipliers lambda (C,) as buffers."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.zeros(num_classes, dim))
        self.register_buffer("anchors", torch.zeros(num_classes, dim))
        self.register_buffer("multipliers", torch.zeros(num_classes))

    def start(self, anchors: torch.Tensor) -> None:
        """Prototypes and anchors = the zero-shot text embeddings (adapters.py:148-150)."""
        with torch.no_grad():
            self.anchors.copy_(anchors)
            self.prototypes.copy_(anchors)

    def forward(self, features: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        return compute_prototype_logits(features, self.prototypes, scale)

    def penalty(self) -> torch.Tensor:
        return compute_zero_shot_penalty(self.prototypes, self.anchors, self.multipliers)


@TRAINERS.register()
class CLAP(FeatureViews, TrainerBase):
    """Frozen encoders; trains the class prototypes only, on the shots' augmented features."""

    frozen_image_encoder = True
    text_anchor = "starts"  # the prototypes start at the class text embeddings and train
    trainable_patterns = (r"^clap\.prototypes$",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of the zero-shot prototypes (raw mean)
        node.CONSTRAINT = "l2"  # l2: CLAP's class-adaptive penalty; none: ZS-LP (no penalty)
        node.AUGMENT_VIEWS = 20  # augmented views per shot as training samples (0 = cached)
        add_epoch_keys(node, [1, 2, 4, 8, 16], [300, 300, 300, 300, 300])
        return node

    def build(self) -> None:
        node, key = self.node, f"TRAINER.{self.config_key()}"
        if node.CONSTRAINT not in CONSTRAINTS:
            raise ValueError(
                f"{key}.CONSTRAINT {node.CONSTRAINT!r} is not one of {', '.join(CONSTRAINTS)}"
            )
        if node.AUGMENT_VIEWS < 0:
            raise ValueError(f"{key}.AUGMENT_VIEWS must be 0 or more, not {node.AUGMENT_VIEWS}")
        if node.WARMUP_EPOCHS < 0:
            raise ValueError(f"{key}.WARMUP_EPOCHS must be 0 or more, not {node.WARMUP_EPOCHS}")
        if self.cfg.OPTIM.BATCH_SIZE < 1:
            raise ValueError(
                f"OPTIM.BATCH_SIZE must be at least 1, not {self.cfg.OPTIM.BATCH_SIZE}"
            )
        # the joint space's width (prototypes sit beside the image features)
        self.network["clap"] = ZeroShotPrototypes(
            len(self.class_names), image_feature_dim(self.clip)
        )

    @property
    def clap(self) -> ZeroShotPrototypes:
        return self.network["clap"]

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach()  # frozen (only the adapter trains, :509-514)

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        """Zero-shot start, lambda from the zero-shot logits of the training pool, then SGD on
        batches of the pool: CE (+ the penalty), the lr stepped once per epoch as Dassl."""
        node, optim, num_classes = self.node, self.cfg.OPTIM, len(self.class_names)
        features, labels = self.training_feature_pool(train, node.AUGMENT_VIEWS)
        clap, scale = self.clap, self.logit_scale()
        clap.start(self.frozen_text_features(node.PROMPT_LEVEL, unit_norm=False))
        with torch.no_grad():
            if node.CONSTRAINT == "l2":
                clap.multipliers.copy_(
                    compute_initial_multipliers(clap(features, scale), labels, num_classes)
                )
            else:
                clap.multipliers.zero_()
        optimizer = build_sgd(self.trainable_named_parameters(), optim, node.MOMENTUM)
        # an epoch = Dassl's batches of the N shots (len(train_loader_x), adapters.py:431),
        # drawn from the shuffled pool of V x N views (:444-456)
        per_epoch = iterations_per_epoch(len(train), optim.BATCH_SIZE)
        total = epoch_iterations(node, optim, len(train), self.cfg.DATASET.NUM_SHOTS)
        epochs = math.ceil(total / per_epoch)
        validation = FeatureValidation(self, val, "balanced_accuracy", keep_ties=False)
        batch, order, loss_value = optim.BATCH_SIZE, None, math.nan
        for step in range(total):
            epoch, index = divmod(step, per_epoch)
            if index == 0:
                order = torch.randperm(len(features), generator=self.generator)
                lr = compute_dassl_epoch_lr(
                    epoch,
                    optim.LR,
                    epochs,
                    node.WARMUP_EPOCHS,
                    optim.WARMUP_CONSTANT_LR,
                    optim.MIN_LR,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
            rows = order[index * batch : (index + 1) * batch].to(features.device)
            losses = {"cross_entropy": F.cross_entropy(clap(features[rows], scale), labels[rows])}
            if node.CONSTRAINT == "l2":
                losses["zero_shot_penalty"] = clap.penalty()
            loss = sum(losses.values())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise DivergedError(step, {k: float(v.detach()) for k, v in losses.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.GRAD_CLIP > 0:
                torch.nn.utils.clip_grad_norm_([clap.prototypes], optim.GRAD_CLIP)
            optimizer.step()
            validation.after_step(step, total, lambda f: clap(f, scale), loss_value)
        return {
            "iterations": total,
            "epochs": epochs,
            "final_loss": loss_value,
            "num_training_features": len(features),
            "multipliers": [round(float(m), 6) for m in clap.multipliers],
            **validation.finish(total),
        }

    # ----- logits -------------------------------------------------------------------------------
    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.clap(features.float(), self.logit_scale())

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.compute_logits_from_features(self.clip.encode_image(images))
