"""Prompt learning below the token embeddings (CoOp, CoCoOp, KgCoOp): learned context vectors
take the place of word embeddings, and the frozen text tower runs on the assembled sequence.

`encode_prompt_embeddings` is the one entry point into a text tower; it takes the model, the
assembled embeddings and the token ids they stand for (which locate the end token), so a
backbone family with another text tower can give it its own body without touching a trainer.
Today it runs the open_clip text transformer (model.text or the CLIP's own text modules).

The assembly follows KaiyangZhou/CoOp trainers/coop.py:98-182: the prompt "X X ... X name." is
tokenised, its embeddings split into the start token (prefix) and the class words, full stop,
end token and padding (suffix), and the context goes at the end (after the start token), in the
middle (half before, half after the class words) or at the front (after the class words).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"  # the word standing for one context vector (coop.py:91)


def _text_modules(model: nn.Module) -> nn.Module:
    """The module holding token_embedding, positional_embedding, transformer and ln_final."""
    tower = model.text if hasattr(model, "text") else model
    if not all(hasattr(tower, n) for n in ("token_embedding", "positional_embedding", "ln_final")):
        raise ValueError(
            f"prompt learning needs an open_clip text transformer, not {type(tower).__name__}:"
            " CoOp, CoCoOp and KgCoOp do not run on Hugging Face text towers yet"
        )
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("prompt learning: text towers with a class token are not supported")
    return tower


def embed_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N, L, W) word embeddings of the text tower (no position added)."""
    return _text_modules(model).token_embedding(tokens)


def encode_prompt_embeddings(
    model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Text features of assembled prompts: embeddings (N, L, W) in the place of the word
    embeddings of `tokens` (N, L) -> (N, D), not normalised. Equal to `model.encode_text(tokens)`
    when `embeddings` are the tokens' own (tested). Gradients flow to `embeddings` through the
    frozen tower (coop.py:46-57: + positions, transformer, ln_final, end token, projection)."""
    tower = _text_modules(model)
    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    mask = getattr(tower, "attn_mask", None)
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = tower.ln_final(x)
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    from open_clip.transformer import text_global_pool

    pooled = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled if projection is None else pooled @ projection


def count_name_tokens(
    tokenizer: Callable[[list[str]], torch.Tensor], names: Sequence[str]
) -> list[int]:
    """BPE tokens of each name alone (coop.py:99): the end token's index minus the start token."""
    tokens = tokenizer(list(names))
    return [int(index) - 1 for index in tokens.argmax(dim=-1)]


def build_prompt_texts(names: Sequence[str], n_ctx: int, prefix: str = "") -> list[str]:
    """ "<prefix or X x n_ctx> <name>." per class (coop.py:91, :100)."""
    prefix = prefix or " ".join([PLACEHOLDER] * n_ctx)
    return [f"{prefix} {name}." for name in names]


def assemble_prompts(
    prefix: torch.Tensor,
    context: torch.Tensor,
    suffix: torch.Tensor,
    name_lengths: Sequence[int],
    position: str,
) -> torch.Tensor:
    """Prompt embeddings (C, L, W) from the start-token embedding prefix (C, 1, W), the context
    (C, M, W) and the suffix (C, L - 1 - M, W) = class words, full stop, end token, padding.

    end: [SOS, ctx, name, ., EOS]; middle: [SOS, ctx[:M//2], name, ctx[M//2:], ., EOS];
    front: [SOS, name, ctx, ., EOS] (coop.py:126-177).
    """
    if position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(
            f"class token position {position!r} is not one of {', '.join(CLASS_TOKEN_POSITIONS)}"
        )
    if position == "end":
        return torch.cat([prefix, context, suffix], dim=1)
    half = context.shape[1] // 2
    prompts = []
    for i, length in enumerate(name_lengths):
        name, rest = suffix[i : i + 1, :length], suffix[i : i + 1, length:]
        ctx = context[i : i + 1]
        if position == "middle":
            parts = [prefix[i : i + 1], ctx[:, :half], name, ctx[:, half:], rest]
        else:
            parts = [prefix[i : i + 1], name, ctx, rest]
        prompts.append(torch.cat(parts, dim=1))
    return torch.cat(prompts, dim=0)


class PromptLearner(nn.Module):
    """CoOp's learned context (coop.py:60-182): `ctx` (M, W) shared, or (C, M, W) class-specific;
    the fixed start-token and class-word embeddings are recomputed from the class names (kept
    as plain tensors, not in checkpoints: coop.py:106-110, :316-321)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        names: Sequence[str],
        n_ctx: int,
        ctx_init: str,
        class_specific: bool,
        position: str,
    ) -> None:
        super().__init__()
        if position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class token position {position!r} is not one of "
                f"{', '.join(CLASS_TOKEN_POSITIONS)}"
            )
        device = model.logit_scale.device
        ctx_init = ctx_init.replace("_", " ").strip()
        with torch.no_grad():
            if ctx_init:  # coop.py:72-80: the words' own embeddings
                n_ctx = len(ctx_init.split(" "))
                init = embed_tokens(model, tokenizer([ctx_init]).to(device))[0, 1 : 1 + n_ctx]
                ctx = init.repeat(len(names), 1, 1) if class_specific else init
            else:  # coop.py:83-90: N(0, 0.02)
                width = _text_modules(model).token_embedding.weight.shape[1]
                shape = (len(names), n_ctx, width) if class_specific else (n_ctx, width)
                ctx = torch.empty(shape).normal_(std=0.02)
            tokens = tokenizer(build_prompt_texts(names, n_ctx, ctx_init)).to(device)
            embedding = embed_tokens(model, tokens).float()
        self.ctx = nn.Parameter(ctx.float().clone())
        self.n_ctx, self.position = n_ctx, position
        self.tokens = (
            tokens.cpu()
        )  # (C, L) ids of the 'X X ... name.' prompts: where the end token is
        self.token_prefix = embedding[:, :1].cpu()  # (C, 1, W) start token
        self.token_suffix = embedding[:, 1 + n_ctx :].cpu()  # (C, L-1-M, W) name, ., end, pad
        self.name_lengths = count_name_tokens(tokenizer, names)

    def forward(self, context: torch.Tensor | None = None) -> torch.Tensor:
        """(C, L, W) prompt embeddings for `context` (M, W) or (C, M, W); default `self.ctx`."""
        ctx = self.ctx if context is None else context
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(self.name_lengths), -1, -1)
        prefix = self.token_prefix.to(ctx.device, ctx.dtype)
        suffix = self.token_suffix.to(ctx.device, ctx.dtype)
        return assemble_prompts(prefix, ctx, suffix, self.name_lengths, self.position)
