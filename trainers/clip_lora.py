"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): LoRA on CLIP's attention, cross-entropy on the
scaled cosine logits against the class text features; AdamW with a cosine schedule; iterations =
ITERS_PER_SHOT x shots. Optional: class-balanced samplers and teacher distillation (DISTILL)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.distillation import build_distiller, distill_config_node
from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.trainer import ImageSet, TrainerBase


@TRAINERS.register()
class CLIPLoRA(TrainerBase):
    """Trainable: the LoRA matrices of the selected encoder(s), layers and projections only."""

    trainable_patterns = (r"\.lora_[AB]\.",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of the class text features
        add_sampler_keys(node)
        node.DISTILL = distill_config_node()
        return node

    def build(self) -> None:
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        self.distiller = build_distiller(self.node.DISTILL, self.class_names, self.device)

    def prepare(self, train: ImageSet) -> None:
        if not self.text_trains:
            self.frozen_text = self.frozen_text_features(self.node.PROMPT_LEVEL)
        if self.distiller is not None:
            self.distiller.prepare(train, self.cfg.CACHE_DIR)
            self.report["distillation"] = self.distiller.describe()

    def class_text(self) -> torch.Tensor:
        return self.text_features(self.node.PROMPT_LEVEL) if self.text_trains else self.frozen_text

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(s f T^T, y) (CLIP-LoRA) + lambda * distillation when DISTILL.SOURCE is set."""
        features = self.compute_image_features(images)
        logits = (self.clip.logit_scale.exp().detach() * features @ self.class_text().t()).float()
        self.batch_logits = logits
        losses = {"cross_entropy": F.cross_entropy(logits, labels)}
        if self.distiller is not None:
            losses["distillation"] = self.distiller.compute_loss(logits, indices)
        return losses

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image features (retrieval metrics use them too)."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def on_eval_start(self) -> None:
        level = self.node.PROMPT_LEVEL
        trains = self.text_trains
        self.eval_text = self.text_features(level) if trains else self.frozen_text_features(level)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return (
            self.clip.logit_scale.exp() * self.compute_image_features(images) @ self.eval_text.t()
        )
