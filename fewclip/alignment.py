"""SAVLT's dual alignment: image features against class texts and learnable class prototypes.

The loss (SAVLT, the dual alignment objective, stated in issue 3):

    L = (1 - a) * CE(s * f T^T, y) + a * CE(s * f P^T, y)

with f the unit-norm image features (B, D), T the unit-norm class-description text features
(C, D), P the learnable class prototypes (C, D), re-normalised at every forward, a the prototype
weight (0.5 in the paper) and s a frozen logit scale (100 in the paper). Inference uses the same
mixture of logits, (1 - a) * s * f T^T + a * s * f P^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassPrototypes(nn.Module):
    """Learnable class prototypes P (C, D): orthogonal init, unit rows at every forward.

    With C <= D the initial rows are orthonormal (P P^T = I); with C > D they are as close to
    orthogonal as the dimension allows (`nn.init.orthogonal_`).
    """

    def __init__(
        self, num_classes: int, dim: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(
                f"ClassPrototypes needs num_classes, dim >= 1 (got {num_classes}, {dim})"
            )
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.orthogonal_(self.weight, generator=generator)

    def forward(self) -> torch.Tensor:
        """(C, D) unit-norm prototypes."""
        return F.normalize(self.weight, dim=-1)


def _check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"dual alignment prototype weight must be in [0, 1], got {weight}")


def compute_dual_alignment_logits(
    features: torch.Tensor,
    text_features: torch.Tensor,
    prototypes: torch.Tensor,
    scale: float,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits s * f T^T and prototype logits s * f P^T, both (B, C), on cosines.

    features (B, D), text_features (C, D), prototypes (C, D); each is normalised here, so the
    products are cosine similarities whatever the inputs' norms.
    """
    _check_weight(weight)
    features = F.normalize(features.float(), dim=-1)
    text_logits = scale * features @ F.normalize(text_features.float(), dim=-1).t()
    prototype_logits = scale * features @ F.normalize(prototypes.float(), dim=-1).t()
    return text_logits, prototype_logits


def compute_dual_alignment_mixture(
    features: torch.Tensor,
    text_features: torch.Tensor,
    prototypes: torch.Tensor,
    scale: float,
    weight: float,
) -> torch.Tensor:
    """Inference logits (B, C) of SAVLT: (1 - a) * s * f T^T + a * s * f P^T (a = `weight`)."""
    text_logits, prototype_logits = compute_dual_alignment_logits(
        features, text_features, prototypes, scale, weight
    )
    return (1.0 - weight) * text_logits + weight * prototype_logits


def compute_dual_alignment_loss(
    features: torch.Tensor,
    text_features: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    weight: float,
) -> torch.Tensor:
    """SAVLT dual alignment loss: (1 - a) * CE(s * f T^T, y) + a * CE(s * f P^T, y).

    features (B, D), text_features (C, D), prototypes (C, D), labels (B,) class indices; a =
    `weight` in [0, 1], s = `scale` (frozen). Cross-entropies are batch means. Returns a scalar.
    """
    text_logits, prototype_logits = compute_dual_alignment_logits(
        features, text_features, prototypes, scale, weight
    )
    return (1.0 - weight) * F.cross_entropy(text_logits, labels) + weight * F.cross_entropy(
        prototype_logits, labels
    )
