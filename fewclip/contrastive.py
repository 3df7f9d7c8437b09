"""CaM-VLA's class-aware cross-modal alignment: cross-attention both ways and a multi-positive
InfoNCE in which every same-class pair of the batch is a positive.

Two attention forms (TRAINER.CAMVLA.ATTENTION):

- `source`, the released code (leibabaya/CaM-VLA, mgca/models/CaM_VLA/
  mgca_module_semantic_vf_structured.py, lines 150-217): no parameters, softmax(Q K^T / sqrt(D)) V
  with V = K, all unit-norm. Text-to-vision: one query, the class text's global feature, over the
  image's patch features. Vision-to-text: one query, the average-pooled patch map, over the class
  text's word features. Each attended feature is contrasted with its query.
- `learned`: fewclip's variant, multi-head attention with LayerNorm and q/k/v/out projections
  (identity at start). Text-to-vision: the class's word tokens over the patches, averaged over
  the words, contrasted with the class text; vision-to-text: the image feature over the words,
  contrasted with the image feature.

The text-to-vision weights are the attention map of an image for a class. Two loss forms
(TRAINER.CAMVLA.LOSS): `source` (-log of the summed positive probability) and `supcon_out`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("source", "supcon_out")
ATTENTIONS = ("source", "learned")
ADAPTERS = ("conv_bn", "none")


def check_choice(value: str, choices: Sequence[str], key: str) -> str:
    """`value` if it is one of `choices`, else a one-line error naming the key and the choices."""
    if value not in choices:
        raise ValueError(f"{key} is {value!r}; choose one of {', '.join(choices)}")
    return value


# ----- losses ----------------------------------------------------------------------------------
def compute_multi_positive_infonce(
    first: torch.Tensor,
    second: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    loss: str = "source",
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between two views of a batch (CaM-VLA's class-aware terms).

    z = cos(first_i, second_j) / temperature (B, B), p_ij = exp z_ij / sum_k exp z_ik, positives
    P(i) = {j : y_j = y_i} (i itself included, no self-pair masking). Per direction:

      source:     L = mean_i [ -log max(sum_{j in P(i)} p_ij, 1e-12) ]
                  (the released code, mgca_module_semantic_vf_structured.py:178-190, 208-217)
      supcon_out: L = mean_i [ -1/|P(i)| sum_{j in P(i)} log p_ij ]
                  (supervised contrastive L_out, Khosla et al., NeurIPS 2020, Eq. 2)

    the same on z^T for the other direction; returns (L_1->2 + L_2->1) / 2. With all labels
    distinct both are CLIP's symmetric InfoNCE. first, second: (B, D); labels: (B,).
    """
    check_choice(loss, LOSSES, "TRAINER.CAMVLA.LOSS")
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0, got {temperature}")
    first = F.normalize(first.float(), dim=-1)
    second = F.normalize(second.float(), dim=-1)
    logits = first @ second.t() / temperature
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()

    def one_way(scores: torch.Tensor) -> torch.Tensor:
        log_probabilities = scores.log_softmax(dim=1)
        if loss == "source":
            mass = (log_probabilities.exp() * positives).sum(dim=1)
            return -mass.clamp_min(1e-12).log().mean()
        return (-(log_probabilities * positives).sum(dim=1) / positives.sum(dim=1)).mean()

    return 0.5 * (one_way(logits) + one_way(logits.t()))


# ----- the source's parameter-free attention ---------------------------------------------------
def compute_scaled_dot_attention(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(D)) K: query (B, Lq, D), keys = values (B, Lk, D), valid (B, Lk)
    bool (False = ignored key) or None. Returns attended (B, Lq, D) and weights (B, Lq, Lk)."""
    scores = query @ keys.transpose(-2, -1) / query.shape[-1] ** 0.5
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ keys, weights


class SourceAlignment(nn.Module):
    """The released code's two attentions (no parameters); inputs are normalised here."""

    def attend_text_to_vision(
        self,
        text: torch.Tensor,
        words: torch.Tensor,
        word_valid: torch.Tensor,
        patches: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class text (B, D) queries patches (B, N, D) (source lines 159-171).

        Returns the anchor = the unit class text (B, D), the attended visual feature (B, D),
        unit norm, and the map over the patches (B, N), summing to 1. `words` are unused."""
        query = F.normalize(text, dim=-1).unsqueeze(1)
        attended, weights = compute_scaled_dot_attention(query, F.normalize(patches, dim=-1))
        return query.squeeze(1), F.normalize(attended.squeeze(1), dim=-1), weights.squeeze(1)

    def attend_vision_to_text(
        self,
        image: torch.Tensor,
        patches: torch.Tensor,
        words: torch.Tensor,
        word_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean patch feature queries the class words (B, L, D) (source lines 156-157,
        160, 193-201). Returns the anchor = the unit mean patch feature (B, D), the attended
        word feature (B, D), unit norm, and the weights over the words (B, L), zero where not
        `word_valid`. `image` is unused."""
        query = F.normalize(patches.mean(dim=1), dim=-1).unsqueeze(1)
        keys = F.normalize(words, dim=-1)
        attended, weights = compute_scaled_dot_attention(query, keys, word_valid)
        return query.squeeze(1), F.normalize(attended.squeeze(1), dim=-1), weights.squeeze(1)


class PatchAdapter(nn.Module):
    """The source's `vf_adapter` on the patch map (lines 62-68, 150-154): Conv3x3 (no bias),
    BatchNorm, ReLU, Conv1x1 (no bias), BatchNorm; (B, N, D) -> (B, N, D) over a rows x columns
    grid (row-major)."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.layers = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(dim),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, dim, *self.grid)
        return self.layers(grid).flatten(2).transpose(1, 2)


# ----- fewclip's learned variant ---------------------------------------------------------------
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


class LearnedAlignment(nn.Module):
    """fewclip's two learned cross-attention modules, in the joint space D; same interface as
    `SourceAlignment`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.text_to_vision = CrossAttention(dim, num_heads)
        self.vision_to_text = CrossAttention(dim, num_heads)

    def attend_text_to_vision(
        self,
        text: torch.Tensor,
        words: torch.Tensor,
        word_valid: torch.Tensor,
        patches: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class words (B, L, D) with valid (B, L) attend over patches (B, N, D). Returns the
        anchor = the class text (B, D), the attended visual content averaged over the words
        (B, D) and the map over the patches averaged over the words (B, N), summing to 1."""
        attended, weights = self.text_to_vision(words, patches)
        visual = compute_masked_mean(attended, word_valid)
        return text, visual, compute_masked_mean(weights, word_valid)

    def attend_vision_to_text(
        self,
        image: torch.Tensor,
        patches: torch.Tensor,
        words: torch.Tensor,
        word_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image features (B, D) attend over class words (B, L, D). Returns the anchor = the
        image feature, the text content (B, D) and the weights over the words (B, L), zero at
        invalid positions. `patches` are unused."""
        attended, weights = self.vision_to_text(image.unsqueeze(1), words, ~word_valid)
        return image, attended.squeeze(1), weights.squeeze(1)


def build_alignment(attention: str, dim: int, num_heads: int) -> nn.Module:
    """`SourceAlignment` (no parameters) or `LearnedAlignment(dim, num_heads)`."""
    check_choice(attention, ATTENTIONS, "TRAINER.CAMVLA.ATTENTION")
    return SourceAlignment() if attention == "source" else LearnedAlignment(dim, num_heads)
