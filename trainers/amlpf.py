"""AMLPF-CLIP (adaptive multi-level prompt fusion, histopathology).

Class texts at three levels (label ensemble, short sentence, morphological description) give
three frozen text classifiers; the student's image features are scored against each and the
level logits are fused with learnable weights (fewclip.fusion). Training: cross-entropy on the
fused logits, class-balanced difficulty resampling (fewclip.samplers) and, optionally,
distillation from a ViT teacher (fewclip.distillation). Inference may average multiple views
(fewclip.multiview).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.distillation import build_distiller, distill_config_node
from fewclip.fusion import PromptFusion, compute_level_logits
from fewclip.lora import apply_lora
from fewclip.multiview import compute_multiview_logits, multiview_config_node
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.trainer import ImageSet, TrainerBase

STUDENTS = ("lora", "full")
LOGIT_SCALES = ("frozen", "clamped")


class LogitScale(nn.Module):
    """A learnable log scale; s = exp(logit_scale) clamped to at most `maximum` (CLIP's rule).

    Named `logit_scale` and 0-d, so the loop never weight-decays it.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(initial)))
        self.maximum = maximum

    def forward(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.maximum)).exp()


@TRAINERS.register()
class AMLPF(TrainerBase):
    """Trainable: the vision LoRA matrices (STUDENT lora) or the whole visual encoder (STUDENT
    full), the fusion weights, and the logit scale when LOGIT_SCALE is clamped."""

    trainable_patterns = (r"^clip\.visual\.", r"^fusion\.weights$", r"^scale\.logit_scale$")

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.LEVELS = ["label", "short", "description"]  # prompt levels fused, in this order
        node.FUSION = "raw"  # "raw" (unconstrained weights, init 1) or "softmax" (sum to 1)
        node.STUDENT = "lora"  # "lora" (LORA node, vision encoder) or "full" (visual fine-tuning)
        node.LOGIT_SCALE = "frozen"  # "frozen" (CLIP's) or "clamped" (learned, s <= MAX_SCALE)
        node.MAX_SCALE = 100.0  # upper bound of the learned logit scale
        add_sampler_keys(node, "difficulty")
        node.DISTILL = distill_config_node()
        node.MULTIVIEW = multiview_config_node()
        return node

    def build(self) -> None:
        node = self.node
        if node.STUDENT not in STUDENTS or node.LOGIT_SCALE not in LOGIT_SCALES:
            raise ValueError(
                f"TRAINER.AMLPF.STUDENT must be one of {STUDENTS} and LOGIT_SCALE one of "
                f"{LOGIT_SCALES} (got {node.STUDENT!r}, {node.LOGIT_SCALE!r})"
            )
        if node.STUDENT == "lora":
            if self.cfg.LORA.ENCODER != "vision":
                raise ValueError(
                    "AMLPF caches its text features: set LORA.ENCODER vision "
                    f"(got {self.cfg.LORA.ENCODER!r})"
                )
            apply_lora(self.clip, self.cfg.LORA)
        else:
            self.clip.visual.requires_grad_(True)
        self.network["fusion"] = PromptFusion(len(node.LEVELS), node.FUSION)
        if node.LOGIT_SCALE == "clamped":
            initial = float(self.clip.logit_scale)
            self.network["scale"] = LogitScale(initial, node.MAX_SCALE)
        self.distiller = build_distiller(node.DISTILL, self.class_names, self.device)
        self.level_text: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        if "scale" in self.network:
            return self.network["scale"]()
        return self.clip.logit_scale.exp().detach()

    def cached_level_text(self) -> torch.Tensor:
        """(K, C, D) class text features per level, computed once (the text encoder is frozen)."""
        if self.level_text is None:
            self.level_text = torch.stack(
                [self.frozen_text_features(level) for level in self.node.LEVELS]
            )
        return self.level_text

    def prepare(self, train: ImageSet) -> None:
        self.cached_level_text()
        if self.distiller is not None:
            self.distiller.prepare(train, self.cfg.CACHE_DIR)
            self.report["distillation"] = self.distiller.describe()

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image features of the student."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def fused_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) = sum_k w_k s f T_k^T."""
        features = self.compute_image_features(images)
        level_logits = compute_level_logits(features, self.cached_level_text(), self.scale())
        return self.network["fusion"](level_logits)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(sum_k w_k s f T_k^T, y) (AMLPF-CLIP fused-logit loss) + lambda * distillation."""
        logits = self.fused_logits(images).float()
        self.batch_logits = logits
        losses = {"cross_entropy": F.cross_entropy(logits, labels)}
        if self.distiller is not None:
            losses["distillation"] = self.distiller.compute_loss(logits, indices)
        return losses

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        views = self.node.MULTIVIEW
        if views.CROPS > 0:
            return compute_multiview_logits(
                self.fused_logits, images, views.CROPS, views.CROP_FRACTION
            )
        return self.fused_logits(images)

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        result = super().fit(train, val, evaluate_fn)
        self.report["fusion_weights"] = self.network["fusion"].describe(list(self.node.LEVELS))
        if "scale" in self.network:
            self.report["logit_scale"] = round(float(self.scale()), 4)
        return result
