"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): LoRA on CLIP's attention, cross-entropy on the
scaled cosine logits against the class text features; AdamW with a cosine schedule; iterations =
ITERS_PER_SHOT x shots."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.trainer import ImageSet, TrainerBase


@TRAINERS.register()
class CLIPLoRA(TrainerBase):
    """Trainable: the LoRA matrices of the selected encoder(s), layers and projections only."""

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of the class text features
        node.SAMPLER = "uniform"  # registered batch sampler
        return node

    def build(self) -> None:
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")

    def prepare(self, train: ImageSet) -> None:
        if not self.text_trains:
            with torch.no_grad():
                self.frozen_text = self.text_features(self.node.PROMPT_LEVEL)

    def class_text(self) -> torch.Tensor:
        return self.text_features(self.node.PROMPT_LEVEL) if self.text_trains else self.frozen_text

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        features = F.normalize(self.clip.encode_image(images), dim=-1)
        logits = self.clip.logit_scale.exp().detach() * features @ self.class_text().t()
        return {"cross_entropy": F.cross_entropy(logits.float(), labels)}

    def on_eval_start(self) -> None:
        self.eval_text = self.text_features(self.node.PROMPT_LEVEL)

    def compute_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.clip.encode_image(images), dim=-1)
        return self.clip.logit_scale.exp() * features @ self.eval_text.t()
