"""Token-level features of an open_clip CLIP: image patch tokens and per-word text tokens.

Both functions run the towers' own modules (so split attention and LoRA layers are used as they
are) and return the pooled feature exactly as `encode_image` / `encode_text` would, plus the
tokens it was pooled from. Supported: open_clip `VisionTransformer` towers with a class token or
average pooling (no attentional pooler), open_clip timm ViT towers (BiomedCLIP's), open_clip text
transformers without a class token, and open_clip Hugging Face (BERT) text towers.
"""

from __future__ import annotations

import torch
from torch import nn

from fewclip.hf_clip import end_token_positions


def _timm_trunk(visual: nn.Module) -> nn.Module | None:
    """The timm ViT inside an open_clip TimmModel, or None for other towers."""
    trunk = getattr(visual, "trunk", None)
    return trunk if trunk is not None and hasattr(trunk, "patch_embed") else None


def _hf_vision(visual: nn.Module) -> nn.Module | None:
    """The Hugging Face CLIP vision transformer of a fewclip.hf_clip tower, or None."""
    return getattr(visual, "vision_model", None)


def _vision_tower(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if _hf_vision(visual) is not None:
        return visual
    trunk = _timm_trunk(visual)
    if trunk is not None:
        if getattr(trunk, "attn_pool", None) is not None:
            raise ValueError("patch tokens: timm towers with an attention pool are not supported")
        if getattr(trunk.patch_drop, "prob", 0.0) > 0:
            raise ValueError("patch tokens: patch dropout would drop tokens off the patch grid")
        return visual
    if visual is None or not hasattr(visual, "output_tokens") or not hasattr(visual, "grid_size"):
        raise ValueError(
            f"patch tokens need a ViT image tower (open_clip or timm), not "
            f"{type(visual).__name__}: this model family has no patch tokens"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("patch tokens: vision towers with an attentional pooler are not supported")
    if getattr(visual.patch_dropout, "prob", 0.0) > 0:
        raise ValueError("patch tokens: patch dropout would drop tokens off the patch grid")
    return visual


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the vision tower's patch grid at its input size."""
    visual = _vision_tower(model)
    if _hf_vision(visual) is not None:
        config = _hf_vision(visual).config
        return (config.image_size // config.patch_size,) * 2
    trunk = _timm_trunk(visual)
    if trunk is not None:
        size, patch = visual.image_size, trunk.patch_embed.patch_size
        return int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1])
    rows, columns = visual.grid_size
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
    if _hf_vision(visual) is not None:  # last_hidden_state is before post_layernorm
        output = _hf_vision(visual)(pixel_values=images)
        tokens = output.last_hidden_state[:, 1:]
        if final_norm:
            tokens = _hf_vision(visual).post_layernorm(tokens)
        return visual.head(output.pooler_output), tokens
    trunk = _timm_trunk(visual)
    if trunk is not None and final_norm:  # timm: forward_features ends with the final norm
        features = trunk.forward_features(images)
        pooled = visual.head(trunk.forward_head(features))
        return pooled, features[:, trunk.num_prefix_tokens :]
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
    visual = _vision_tower(model)
    if _hf_vision(visual) is not None:
        return visual.head(tokens)
    trunk = _timm_trunk(visual)
    if trunk is not None:  # the pooled path: fc_norm, then the adapter head (Linear or MLP)
        return visual.head(trunk.fc_norm(tokens))
    projection = visual.proj
    return tokens if projection is None else tokens @ projection.to(tokens.dtype)


def image_projection(model: nn.Module) -> nn.Module | nn.Parameter:
    """The vision tower's projection to the joint space (what `project_image_tokens` applies):
    open_clip's `visual.proj` matrix, or a timm tower's adapter head (Linear or MLP)."""
    visual = _vision_tower(model)
    has_head = _timm_trunk(visual) is not None or _hf_vision(visual) is not None
    projection = visual.head if has_head else visual.proj
    if projection is None:
        raise ValueError(f"the {type(visual).__name__} image tower has no projection (proj None)")
    return projection


def image_token_width(model: nn.Module) -> int:
    """Width W of the patch tokens `encode_image_tokens` returns (before the projection)."""
    visual = _vision_tower(model)
    if _hf_vision(visual) is not None:
        return int(_hf_vision(visual).config.hidden_size)
    trunk = _timm_trunk(visual)
    return int(trunk.embed_dim) if trunk is not None else int(visual.ln_post.normalized_shape[0])


def text_projection(model: nn.Module) -> nn.Module | nn.Parameter:
    """The text tower's projection (`project_text_tokens`): open_clip's `text_projection`, or a
    Hugging Face tower's `proj` module."""
    tower = _text_tower(model)
    return tower.proj if _is_hf_text(tower) else tower.text_projection


def _is_hf_text(tower: nn.Module) -> bool:
    return hasattr(tower, "pooler") and hasattr(tower, "config") and hasattr(tower, "proj")


def _text_tower(model: nn.Module) -> nn.Module:
    tower = model.text if hasattr(model, "text") else model
    if _is_hf_text(tower) or hasattr(tower, "text_model"):
        return tower
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
    if _is_hf_text(tower):
        return _encode_hf_text_tokens(tower, text, project)
    if hasattr(tower, "text_model"):
        return _encode_hf_clip_text_tokens(tower, text, project)
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
    tower = _text_tower(model)
    if _is_hf_text(tower):
        return tower.proj(features)
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        return projection(features)
    return features if projection is None else features @ projection


def _encode_hf_text_tokens(
    tower: nn.Module, text: torch.Tensor, project: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`encode_text_tokens` of an open_clip HFTextEncoder: the encoder's last hidden states;
    valid = not padding and not the class token at position 0."""
    attention = (text != tower.config.pad_token_id).long()
    output = tower.transformer(input_ids=text, attention_mask=attention)
    pooled, tokens = tower.pooler(output, attention), output.last_hidden_state
    if project:
        pooled, tokens = tower.proj(pooled), tower.proj(tokens)
    positions = torch.arange(text.shape[1], device=text.device)
    return pooled, tokens, attention.bool() & (positions >= 1)


def _encode_hf_clip_text_tokens(
    tower: nn.Module, text: torch.Tensor, project: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`encode_text_tokens` of a Hugging Face CLIP text tower (fewclip.hf_clip): the hidden
    states after its final LayerNorm; valid from position 1 to the first end token."""
    output = tower.text_model(input_ids=text)
    pooled, tokens = output.pooler_output, output.last_hidden_state
    if project:
        pooled, tokens = tower.text_projection(pooled), tower.text_projection(tokens)
    end = end_token_positions(tower.text_model, text)
    positions = torch.arange(text.shape[1], device=text.device)
    return pooled, tokens, (positions >= 1) & (positions <= end.unsqueeze(1))
