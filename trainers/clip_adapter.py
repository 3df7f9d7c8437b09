"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023): a bottleneck MLP on the image features, blended back with ratio alpha.

Released code: gaopengcuhk/CLIP-Adapter clip_adapter.py. The adapter is Linear(D, D/4) - ReLU -
Linear(D/4, D) - ReLU, both bias-free (:55-67); f' = 0.2 adapter(f) + 0.8 f (:102-105); logits =
exp(logit_scale) cos(f', T) (:109-113); only the adapter trains (:133-136). Because the adapter is
bias-free with ReLUs, adapter(c f) = c adapter(f) for c > 0, so it reads the cached unit-norm
frozen features with the same normalised output as the raw ones (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.epoch_schedule import DasslSchedule, add_epoch_keys
from fewclip.families import image_feature_dim
from fewclip.registry import TRAINERS
from fewclip.trainer import ImageSet, TrainerBase


class FeatureAdapter(nn.Module):
    """Linear(D, D // r, bias False) - ReLU - Linear(D // r, D, bias False) - ReLU."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


def blend_adapted(features: torch.Tensor, adapted: torch.Tensor, ratio: float) -> torch.Tensor:
    """Unit-norm ratio * adapted + (1 - ratio) * features: (N, D), (N, D) -> (N, D)."""
    return F.normalize(ratio * adapted + (1 - ratio) * features, dim=-1)


@TRAINERS.register()
class CLIPAdapter(DasslSchedule, TrainerBase):
    """Trainable: the adapter only; the image encoder is frozen and its features cached."""

    frozen_image_encoder = True
    trainable_patterns = (r"^adapter\.",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of the class text features
        node.REDUCTION = 4  # bottleneck D -> D / REDUCTION (source: 4)
        node.RATIO = 0.2  # alpha of alpha * adapter(f) + (1 - alpha) * f (source: 0.2)
        add_epoch_keys(node, [1, 2, 4, 8, 16], [50, 100, 100, 200, 200])
        return node

    def build(self) -> None:
        if not 0.0 <= self.node.RATIO <= 1.0:
            raise ValueError(f"TRAINER.CLIPADAPTER.RATIO must be in [0, 1], not {self.node.RATIO}")
        dim = image_feature_dim(self.clip)
        if self.node.REDUCTION < 1 or dim // self.node.REDUCTION < 1:
            raise ValueError(
                f"TRAINER.CLIPADAPTER.REDUCTION {self.node.REDUCTION} must be in 1..{dim}"
            )
        self.network["adapter"] = FeatureAdapter(dim, self.node.REDUCTION)

    # ----- training on cached features ----------------------------------------------------------
    def prepare(self, train: ImageSet) -> None:
        self.num_train = len(train)
        self.train_features = self.image_features(train).to(self.device)
        self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE on the adapted logits of the shots' cached features (clip_adapter.py:155-158)."""
        rows = torch.as_tensor(indices, device=self.train_features.device)
        logits = self.compute_logits_from_features(self.train_features[rows]).float()
        self.batch_logits = logits
        return {"cross_entropy": F.cross_entropy(logits, labels)}

    def on_eval_start(self) -> None:
        if getattr(self, "class_text", None) is None:  # a trainer restored from a checkpoint
            self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        adapted = self.network["adapter"](features)
        blended = blend_adapted(features, adapted.to(features.dtype), self.node.RATIO)
        text = self.class_text.to(blended.dtype)
        return self.clip.logit_scale.exp().detach() * blended @ text.t()

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.compute_logits_from_features(
            F.normalize(self.clip.encode_image(images), dim=-1)
        )
