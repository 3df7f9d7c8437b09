"""CaM-VLA's class-aware cross-modal alignment: cross-attention both ways and a multi-positive
InfoNCE in which every same-class pair of the batch is a positive.

text-to-vision: the word tokens of the image's (true) class description attend over the image's
patch tokens; the attended visual content, averaged over the words, is contrasted with the class
text features. vision-to-text: the image feature attends over its class's word tokens; the
attended text content is contrasted with the image features. The text-to-vision weights,
averaged over the words, are the attention map of an image for a class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Lq, D) over keys (B, Lk, D), values = keys.

    Queries and keys are layer-normalised before their projections; all four projections start as
    the identity, so the output starts as an attention-weighted mean of the keys (same space).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"CrossAttention: {num_heads} heads do not divide the width {dim}")
        self.num_heads = num_heads
        self.query_norm = nn.LayerNorm(dim)
        self.key_norm = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in "qkvo")
        with torch.no_grad():
            for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                linear.weight.copy_(torch.eye(dim))
                linear.bias.zero_()

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_padding (B, Lk) bool, True = ignored key. Returns output (B, Lq, D) and the
        weights averaged over heads (B, Lq, Lk); each row sums to 1 over the kept keys."""
        batch, query_length, dim = query.shape
        head_dim = dim // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(self.query_norm(query)))
        k = heads(self.k_proj(self.key_norm(keys)))
        v = heads(self.v_proj(keys))
        scores = q @ k.transpose(-2, -1) / head_dim**0.5
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, query_length, dim)
        return self.out_proj(attended), weights.mean(dim=1)


def compute_masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values (B, L, ...) averaged over the positions where valid (B, L) is True -> (B, ...)."""
    weights = valid.to(values.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.einsum("bl,bl...->b...", weights, values)


class ClassAwareAlignment(nn.Module):
    """The two class-aware cross-attention modules of CaM-VLA, in the joint space D."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.text_to_vision = CrossAttention(dim, num_heads)
        self.vision_to_text = CrossAttention(dim, num_heads)

    def attend_text_to_vision(
        self, words: torch.Tensor, word_valid: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class words (B, L, D) with valid (B, L) attend over patches (B, N, D).

        Returns the attended visual content averaged over the words (B, D) and the attention map
        over the patches, averaged over the words (B, N), summing to 1.
        """
        attended, weights = self.text_to_vision(words, patches)
        return compute_masked_mean(attended, word_valid), compute_masked_mean(weights, word_valid)

    def attend_vision_to_text(
        self, image: torch.Tensor, words: torch.Tensor, word_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, D) attend over class words (B, L, D) -> text content (B, D) and
        the weights over the words (B, L), zero at invalid positions."""
        attended, weights = self.vision_to_text(image.unsqueeze(1), words, ~word_valid)
        return attended.squeeze(1), weights.squeeze(1)


def compute_multi_positive_infonce(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between two views of a batch (CaM-VLA's class-aware terms).

    With z = cos(first_i, second_j) / temperature (B, B) and positives P(i) = {j : y_j = y_i}:

        L_1->2 = mean_i [ -1/|P(i)| sum_{j in P(i)} log( exp z_ij / sum_k exp z_ik ) ]

    the supervised contrastive loss L_out (Khosla et al., NeurIPS 2020, Eq. 2) across the two
    views, and L_2->1 the same on z^T; returns (L_1->2 + L_2->1) / 2. With all labels distinct it
    is CLIP's symmetric InfoNCE (Radford et al. 2021; van den Oord et al. 2018, Eq. 4).
    first, second: (B, D); labels: (B,). Every i has itself as a positive, so |P(i)| >= 1.
    """
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0, got {temperature}")
    first = F.normalize(first.float(), dim=-1)
    second = F.normalize(second.float(), dim=-1)
    logits = first @ second.t() / temperature
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    counts = positives.sum(dim=1)

    def one_way(scores: torch.Tensor) -> torch.Tensor:
        log_probabilities = scores.log_softmax(dim=1)
        return (-(log_probabilities * positives).sum(dim=1) / counts).mean()

    return 0.5 * (one_way(logits) + one_way(logits.t()))
