"""Multi-level prompt fusion (AMLPF-CLIP): one classifier per prompt level, logits fused by
learnable level weights.

Each class has texts at K levels (label ensemble, short sentence, detailed description); each
level gives a (C, D) text classifier, cached once because the text encoder is frozen. Level logits
are L_k = s * f T_k^T and the fused logits are sum_k w_k L_k.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FUSION_MODES = ("raw", "softmax")


def compute_level_logits(
    features: torch.Tensor, level_text: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """L_k = s * f T_k^T for every level.

    features: (B, D) unit-norm image features; level_text: (K, C, D) unit-norm class text features
    per level; scale: scalar s. Returns (K, B, C).
    """
    return scale * torch.einsum("bd,kcd->kbc", features, level_text.to(features.dtype))


def compute_fused_logits(level_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fused logits sum_k w_k L_k (AMLPF-CLIP prompt fusion).

    level_logits: (K, B, C); weights: (K,). Returns (B, C).
    """
    return torch.einsum("k,kbc->bc", weights.to(level_logits.dtype), level_logits)


class PromptFusion(nn.Module):
    """Learnable level weights.

    `raw` (the paper): w = the unconstrained parameter itself, initialised to 1 per level.
    `softmax`: w = softmax(theta), theta initialised to 0, so w starts at 1/K and sums to 1.
    The parameter is 1-D, so the loop never applies weight decay to it.
    """

    def __init__(self, num_levels: int, mode: str = "raw") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {', '.join(FUSION_MODES)}")
        if num_levels < 1:
            raise ValueError("prompt fusion needs at least one prompt level")
        self.mode = mode
        initial = torch.ones(num_levels) if mode == "raw" else torch.zeros(num_levels)
        self.weights = nn.Parameter(initial)

    def level_weights(self) -> torch.Tensor:
        """(K,) weights w applied to the level logits."""
        return self.weights if self.mode == "raw" else torch.softmax(self.weights, dim=0)

    def forward(self, level_logits: torch.Tensor) -> torch.Tensor:
        return compute_fused_logits(level_logits, self.level_weights())

    def describe(self, levels: list[str]) -> dict[str, float]:
        """Level name -> current weight, for results.json."""
        weights = self.level_weights().detach().float().cpu().tolist()
        return {level: round(weight, 6) for level, weight in zip(levels, weights)}
