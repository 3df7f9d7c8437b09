"""Multi-head attention with its projections as four separate `nn.Linear` layers.

`nn.MultiheadAttention` keeps q, k and v in one fused `in_proj_weight` and calls its `out_proj`
through the functional API, so LoRA libraries cannot wrap q/k/v one by one (and peft 0.21 applies
a LoRA on `out_proj` twice). `split_attention` swaps every `nn.MultiheadAttention` of a model for
a `SplitAttention` with the same weights and the same call signature, so open_clip's blocks keep
calling `self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=attn_mask)` unchanged.
timm's ViT `Attention` fuses q, k and v in one `qkv` Linear the same way; it becomes a
`SplitQKVAttention` with `q_proj, k_proj, v_proj` and timm's own `proj`, norms and dropouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


class SplitAttention(nn.Module):
    """Drop-in replacement of `nn.MultiheadAttention` with `q_proj, k_proj, v_proj, out_proj`."""

    def __init__(self, source: nn.MultiheadAttention) -> None:
        super().__init__()
        if source.bias_k is not None or source.add_zero_attn:
            raise ValueError(
                "SplitAttention does not support MultiheadAttention with bias_k or add_zero_attn"
            )
        self.embed_dim = source.embed_dim
        self.num_heads = source.num_heads
        self.head_dim = source.head_dim
        self.dropout = source.dropout
        self.batch_first = source.batch_first
        has_bias = source.in_proj_bias is not None
        dim = self.embed_dim
        like = {"device": source.out_proj.weight.device, "dtype": source.out_proj.weight.dtype}
        # skip_init: no random init (the weights are copied below, and the global RNG is untouched)
        self.q_proj = skip_init(nn.Linear, dim, dim, bias=has_bias, **like)
        self.k_proj = skip_init(nn.Linear, source.kdim, dim, bias=has_bias, **like)
        self.v_proj = skip_init(nn.Linear, source.vdim, dim, bias=has_bias, **like)
        self.out_proj = skip_init(
            nn.Linear, dim, dim, bias=source.out_proj.bias is not None, **like
        )
        with torch.no_grad():
            if source.in_proj_weight is not None:
                weights = source.in_proj_weight.chunk(3, dim=0)
            else:
                weights = (source.q_proj_weight, source.k_proj_weight, source.v_proj_weight)
            biases = source.in_proj_bias.chunk(3, dim=0) if has_bias else (None, None, None)
            for linear, weight, bias in zip(
                (self.q_proj, self.k_proj, self.v_proj), weights, biases
            ):
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            self.out_proj.weight.copy_(source.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(source.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `nn.MultiheadAttention.forward`.

        query: (N, L, E) if batch_first else (L, N, E); key/value: (N, S, E) likewise.
        attn_mask: (L, S) or (N * heads, L, S); bool True = blocked, float = added to the scores.
        key_padding_mask: (N, S); bool True = padding (ignored key), float = added.
        Returns (output like query, attention weights (N, L, S) or per head, or None).
        """
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target_length, _ = query.shape
        source_length = key.shape[1]

        def heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), target_length)
        k = heads(self.k_proj(key), source_length)
        v = heads(self.v_proj(value), source_length)
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(target_length, source_length, dtype=torch.bool, device=q.device)
                scores = scores.masked_fill(~causal.tril(), float("-inf"))
            weights = scores.softmax(dim=-1)
            attended = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        output = self.out_proj(
            attended.transpose(1, 2).reshape(batch, target_length, self.embed_dim)
        )
        if unbatched:
            output = output.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _additive_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Combine both masks into one float mask broadcastable to (N, heads, L, S)."""
        mask = None
        if attn_mask is not None:
            mask = _to_additive(attn_mask, dtype)
            if mask.dim() == 3:
                mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            padding = _to_additive(key_padding_mask, dtype).view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = blocked) -> float mask with -inf; float masks pass through."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class SplitQKVAttention(nn.Module):
    """timm's ViT `Attention` with its fused `qkv` Linear as `q_proj, k_proj, v_proj`.

    Same forward as timm.layers.Attention: x (B, N, C) -> (B, N, C); q_norm, k_norm, norm, gate,
    proj and the dropouts are timm's own modules, moved over unchanged.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.num_heads = source.num_heads
        self.head_dim = source.head_dim
        self.attn_dim = source.attn_dim
        self.scale = source.scale
        fused = source.qkv
        has_bias = fused.bias is not None
        like = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        projections = []
        for chunk_index in range(3):
            linear = skip_init(nn.Linear, fused.in_features, self.attn_dim, bias=has_bias, **like)
            rows = slice(chunk_index * self.attn_dim, (chunk_index + 1) * self.attn_dim)
            with torch.no_grad():
                linear.weight.copy_(fused.weight[rows])
                if has_bias:
                    linear.bias.copy_(fused.bias[rows])
            linear.weight.requires_grad_(fused.weight.requires_grad)
            if has_bias:
                linear.bias.requires_grad_(fused.bias.requires_grad)
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        self.q_norm, self.k_norm = source.q_norm, source.k_norm
        self.attn_drop, self.norm, self.gate = source.attn_drop, source.norm, source.gate
        self.proj, self.proj_drop = source.proj, source.proj_drop

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None

        def heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = self.q_norm(heads(self.q_proj(x)))
        k = self.k_norm(heads(self.k_proj(x)))
        v = heads(self.v_proj(x))
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
        )
        x = self.norm(attended.transpose(1, 2).reshape(batch, length, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class SplitAttentionPool(nn.Module):
    """open_clip's ResNet `AttentionPool2d` calling its q_proj, k_proj, v_proj, c_proj modules
    (the original hands their weights to the functional API, so LoRA layers would be skipped).

    Same parameters and names (state dicts load unchanged), same output: x (N, C, H, W) ->
    (N, D), the attention output of the mean token over the positional-embedded grid."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.positional_embedding = source.positional_embedding
        self.q_proj, self.k_proj, self.v_proj = source.q_proj, source.k_proj, source.v_proj
        self.c_proj = source.c_proj
        self.num_heads = source.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(projected: torch.Tensor, tokens: int) -> torch.Tensor:
            return projected.view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(x[:, :1]), 1)  # only the mean token's output is returned
        k, v = heads(self.k_proj(x), length), heads(self.v_proj(x), length)
        attended = F.scaled_dot_product_attention(q, k, v)  # (N, heads, 1, head_dim)
        return self.c_proj(attended.transpose(1, 2).reshape(batch, width))


def _is_resnet_attention_pool(module: nn.Module) -> bool:
    from open_clip.modified_resnet import AttentionPool2d

    return type(module) is AttentionPool2d


def _is_timm_attention(module: nn.Module) -> bool:
    try:
        from timm.layers import Attention
    except ImportError:  # timm is optional: no timm tower without it
        return False
    return type(module) is Attention  # subclasses may change the forward


def split_attention(model: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` in `model` by a `SplitAttention`, every timm ViT
    `Attention` by a `SplitQKVAttention` and every open_clip ResNet attention pool by a
    `SplitAttentionPool`; return the count."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        or _is_timm_attention(module)
        or _is_resnet_attention_pool(module)
    ]
    for name, module in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.MultiheadAttention):
            replacement = SplitAttention(module)
            for parameter in replacement.parameters():
                parameter.requires_grad_(module.out_proj.weight.requires_grad)
        elif _is_resnet_attention_pool(module):
            replacement = SplitAttentionPool(module)
        else:
            replacement = SplitQKVAttention(module)
        replacement.train(module.training)
        setattr(parent, attribute, replacement)
    return len(targets)
