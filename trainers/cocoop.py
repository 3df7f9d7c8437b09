"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022):
CoOp's context shifted per image by a meta-net bias, pi(x) = Linear-ReLU-Linear(f(x)).

Released code: KaiyangZhou/CoOp trainers/cocoop.py. Meta-net Linear(D, D/16) - ReLU -
Linear(D/16, W) on the unit-norm image feature (:95-99, :179-181); ctx + bias for every class
(:144-161); per image, its C prompts through the text tower and CE (:183-192). The source loops
over the images of a batch of 1; fewclip assembles the B x C prompts of a batch and runs them
through the text tower in one pass (the same numbers as the loop, tested), so a batch > 1 costs
one text-tower call per step and evaluation needs no per-image loop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.families import image_feature_dim
from fewclip.prompt_learning import encode_prompt_embeddings
from fewclip.registry import TRAINERS

from .coop import CoOp, coop_config_node


class MetaNet(nn.Module):
    """Linear(D, D // 16) - ReLU - Linear(D // 16, W): image feature (B, D) -> bias (B, W)."""

    def __init__(self, image_dim: int, context_dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, image_dim // reduction)
        self.linear1 = nn.Linear(image_dim, hidden)
        self.linear2 = nn.Linear(hidden, context_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.linear1(features)))


@TRAINERS.register()
class CoCoOp(CoOp):
    """Trainable: the context vectors and the meta-net."""

    trainable_patterns = (r"^prompt_learner\.ctx$", r"^meta_net\.")

    @classmethod
    def config_node(cls) -> CfgNode:
        node = coop_config_node()
        node.N_CTX = 4  # vit_b16_c4_ep10_batch1_ctxv1.yaml
        node.CTX_INIT = "a photo of a"
        node.EPOCH_SHOTS = [16]  # the released configs: 10 epochs
        node.EPOCHS = [10]
        node.REDUCTION = 16  # meta-net bottleneck D -> D / REDUCTION (cocoop.py:96)
        node.PROMPT_CHUNK = 2048  # at most this many prompts per text-tower call (memory only)
        return node

    def build(self) -> None:
        if self.node.CSC:
            raise ValueError("TRAINER.COCOOP.CSC True is not CoCoOp: its context is shared")
        super().build()
        width = self.prompt_learner.ctx.shape[-1]
        self.network["meta_net"] = MetaNet(image_feature_dim(self.clip), width, self.node.REDUCTION)

    def conditioned_text(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, D) unit-norm class text features of each image's shifted context, for unit-norm
        image features (B, D): ctx + meta_net(f) -> B x C prompts -> one text-tower pass."""
        learner = self.prompt_learner
        bias = self.network["meta_net"](features.to(learner.ctx.dtype))  # (B, W)
        shifted = learner.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, M, W)
        prompts = torch.cat([learner(context=ctx) for ctx in shifted])  # (B * C, L, W)
        tokens = learner.tokens.to(prompts.device).repeat(len(features), 1)
        text = encode_prompt_embeddings(self.clip, prompts, tokens).float()
        return F.normalize(text, dim=-1).view(len(features), len(self.class_names), -1)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        logits = self.compute_logits_from_features(self.encode_images(images))
        self.batch_logits = logits
        return {"cross_entropy": F.cross_entropy(logits, labels)}

    def on_eval_start(self) -> None:
        """The class text depends on each image, so there is nothing to precompute."""

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) = exp(logit_scale) <f_n, t_c(f_n)> (cocoop.py:184-189), in chunks of images."""
        step = max(1, self.node.PROMPT_CHUNK // len(self.class_names))
        outputs = []
        for start in range(0, len(features), step):
            chunk = features[start : start + step].float()
            text = self.conditioned_text(chunk)
            outputs.append(self.logit_scale() * torch.einsum("bd,bcd->bc", chunk, text))
        return torch.cat(outputs)
