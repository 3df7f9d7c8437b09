"""Token-level features of an open_clip CLIP: image patch tokens and per-word text tokens.

Both functions run the towers' own modules (so split attention and LoRA layers are used as they
are) and return the pooled feature exactly as `encode_image` / `encode_text` would, plus the
tokens it was pooled from. Supported: open_clip `VisionTransformer` towers with a class token or
average pooling (no attentional pooler), and open_clip text transformers without a class token.
"""

from __future__ import annotations

import torch
from torch import nn


def _vision_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "output_tokens") or not hasattr(visual, "grid_size"):
        raise ValueError(
            f"patch tokens need an open_clip VisionTransformer tower, not "
            f"{type(visual).__name__} (timm and other towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("patch tokens: vision towers with an attentional pooler are not supported")
    if getattr(visual.patch_dropout, "prob", 0.0) > 0:
        raise ValueError("patch tokens: patch dropout would drop tokens off the patch grid")
    return visual


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the vision tower's patch grid."""
    rows, columns = _vision_tower(model).grid_size
    return int(rows), int(columns)


def encode_image_tokens(
    model: nn.Module, images: torch.Tensor, final_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled image features and the patch tokens of the last block.

    images: (B, 3, H, W) normalised. Returns pooled (B, D), equal to `model.encode_image(images)`,
    and patch tokens (B, N, W) in the tower's width W (not projected; see
    `project_image_tokens`), row-major over the `patch_grid` (N = rows x columns). With
    `final_norm` the tokens are taken after the final LayerNorm (ln_post); without it, as the
    last block left them, before ln_post (what SAVLT's released code pools: Hugging Face
    CLIP's `last_hidden_state`, which its vision model returns before `post_layernorm`).
    """
    visual = _vision_tower(model)
    if not final_norm:
        # the tower's own intermediates API: the last block's output without the class token
        output = visual.forward_intermediates(images, indices=1, output_fmt="NLC")
        return output["image_features"], output["image_intermediates"][-1]
    previous = visual.output_tokens
    visual.output_tokens = True  # the tower's own switch: forward returns (pooled, tokens)
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = previous
    if visual.final_ln_after_pool:  # the tower normalised only the pooled token
        tokens = visual.ln_post(tokens)
    return pooled, tokens


def project_image_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, W) patch tokens -> (B, N, D) in the joint embedding space (the visual projection)."""
    projection = _vision_tower(model).proj
    return tokens if projection is None else tokens @ projection.to(tokens.dtype)


def _text_tower(model: nn.Module) -> nn.Module:
    tower = model.text if hasattr(model, "text") else model
    if not hasattr(tower, "token_embedding") or not hasattr(tower, "ln_final"):
        raise ValueError(
            f"word tokens need an open_clip text transformer, not {type(tower).__name__}"
        )
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise ValueError(
            "word tokens: text towers with a class token or pad mask are not supported"
        )
    return tower


def encode_text_tokens(
    model: nn.Module, text: torch.Tensor, project: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled text features, per-position token features and the mask of word positions.

    text: (B, L) token ids. Returns pooled (B, D), equal to `model.encode_text(text)`; tokens
    (B, L, D) after the final LayerNorm and the text projection; valid (B, L) bool, True at the
    words and the end token (the start token and the padding after the end token are False).
    project=False stops before the text projection (pooled and tokens in the tower's width W);
    `project_text_tokens` applies it later, e.g. to features cached from a frozen tower.
    """
    tower = _text_tower(model)
    length = text.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    mask = tower.attn_mask
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = tower.ln_final(x)
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    from open_clip.transformer import text_global_pool  # here: importing fewclip stays light

    pooled = text_global_pool(x, text, pool_type, eos_token_id=eos_id)
    if project:
        pooled, x = project_text_tokens(model, pooled), project_text_tokens(model, x)
    if pool_type == "eos" and eos_id is not None:
        end = (text == eos_id).int().argmax(dim=-1)
    else:  # open_clip's default tokenizer: the end token has the largest id
        end = text.argmax(dim=-1)
    positions = torch.arange(length, device=text.device)
    valid = (positions >= 1) & (positions <= end.unsqueeze(1))
    return pooled, x, valid


def project_text_tokens(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(..., W) text features before the projection -> (..., D) in the joint embedding space."""
    projection = _text_tower(model).text_projection
    if isinstance(projection, nn.Linear):
        return projection(features)
    return features if projection is None else features @ projection
