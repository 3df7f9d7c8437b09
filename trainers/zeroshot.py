"""Zero-shot CLIP: a text classifier from the dataset's prompts (template ensemble), no training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.registry import TRAINERS
from fewclip.trainer import TrainerBase


@TRAINERS.register()
class ZeroShotCLIP(TrainerBase):
    """logits = exp(logit_scale) * f T^T with T the ensemble of templated class labels."""

    text_anchor = "predicts"
    trains = False
    frozen_image_encoder = True

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level for the classifier: label, short or description
        return node

    def on_eval_start(self) -> None:
        self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * features @ self.class_text.t()

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        features = torch.nn.functional.normalize(self.clip.encode_image(images), dim=-1)
        return self.compute_logits_from_features(features)
