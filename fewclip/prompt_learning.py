"""Prompt learning below the token embeddings (CoOp, CoCoOp, KgCoOp): learned context vectors
take the place of word embeddings, and the frozen text tower runs on the assembled sequence.

`encode_prompt_embeddings` is the one entry point into a text tower; it takes the model, the
assembled embeddings and the token ids they stand for (which give the attention mask and the
end token), and runs the body of the model's text tower (`fewclip.text_body`): open_clip's text
transformer, open_clip's Hugging Face BERT tower (BiomedCLIP) or a Hugging Face CLIP text model
(PLIP), so no trainer branches on the family. A tower no body can run (an open_clip tower with a
class token, an unknown Hugging Face encoder) is a one-line error naming it.

The assembly follows KaiyangZhou/CoOp trainers/coop.py:98-182: the prompt "X X ... X name." is
tokenised, its embeddings split into the start token (prefix: <|startoftext|> or [CLS]) and the
class words, full stop, end token and padding (suffix), and the context goes at the end (after
the start token), in the middle (half before, half after the class words) or at the front
(after the class words). The context occupies the "X" positions of the token ids, so the ids'
padding mask and end-token position are the assembled prompt's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fewclip.text_body import text_body

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"  # the word standing for one context vector (coop.py:91)


def embed_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) token ids -> (N, L, W) word embeddings of the text tower (no position added)."""
    return text_body(model).embed(tokens)


def encode_prompt_embeddings(
    model: nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Text features of assembled prompts: embeddings (N, L, W) in the place of the word
    embeddings of `tokens` (N, L) -> (N, D), not normalised. Equal to `model.encode_text(tokens)`
    when `embeddings` are the tokens' own (tested on every family). Gradients flow to
    `embeddings` through the frozen tower (coop.py:46-57: positions, transformer, the end
    token's or the tower's pooling, projection); the tokens give the attention mask and the
    pooled position."""
    return text_body(model).encode(embeddings, tokens)


def count_name_tokens(
    model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], names: Sequence[str]
) -> list[int]:
    """Tokens of each name alone (coop.py:99): the end token's index minus the start token's,
    the end token found as the model's text tower finds it (BPE end token, BERT [SEP])."""
    return [int(end) - 1 for end in text_body(model).end_positions(tokenizer(list(names)))]


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
        body = text_body(model)
        ctx_init = ctx_init.replace("_", " ").strip()
        with torch.no_grad():
            if ctx_init:  # coop.py:72-80: the words' own embeddings, one vector per token
                n_ctx = count_name_tokens(model, tokenizer, [ctx_init])[0]
                init = body.embed(tokenizer([ctx_init]).to(device))[0, 1 : 1 + n_ctx]
                ctx = init.repeat(len(names), 1, 1) if class_specific else init
            else:  # coop.py:83-90: N(0, 0.02)
                shape = (len(names), n_ctx, body.width) if class_specific else (n_ctx, body.width)
                ctx = torch.empty(shape).normal_(std=0.02)
            tokens = tokenizer(build_prompt_texts(names, n_ctx, ctx_init)).to(device)
            embedding = body.embed(tokens).float()
        name_lengths = count_name_tokens(model, tokenizer, names)
        ends = body.end_positions(tokens).tolist()
        for name, length, end in zip(names, name_lengths, ends):
            if end < 1 + n_ctx + length + 1:  # start, context, name, full stop: cut to fit
                raise ValueError(
                    f"prompt learning: {n_ctx} context vectors and the class words {name!r}"
                    f" ({length} tokens) do not fit the text tower's {tokens.shape[1]} tokens;"
                    " use fewer context vectors or shorter class words"
                )
        self.ctx = nn.Parameter(ctx.float().clone())
        self.n_ctx, self.position = n_ctx, position
        # (C, L) ids of the 'X X ... name.' prompts: the end token's place and the padding mask
        self.tokens = tokens.cpu()
        self.token_prefix = embedding[:, :1].cpu()  # (C, 1, W) start token ([CLS] for BERT)
        self.token_suffix = embedding[:, 1 + n_ctx :].cpu()  # (C, L-1-M, W) name, ., end, pad
        self.name_lengths = name_lengths

    def forward(self, context: torch.Tensor | None = None) -> torch.Tensor:
        """(C, L, W) prompt embeddings for `context` (M, W) or (C, M, W); default `self.ctx`."""
        ctx = self.ctx if context is None else context
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(self.name_lengths), -1, -1)
        prefix = self.token_prefix.to(ctx.device, ctx.dtype)
        suffix = self.token_suffix.to(ctx.device, ctx.dtype)
        return assemble_prompts(prefix, ctx, suffix, self.name_lengths, self.position)
