"""The text tower of each model family as prompt learning needs it: token ids -> word
embeddings, and given word embeddings -> text features (the tower's masks, positions, pooling
and projection), plus where each prompt's end token is.

`text_body(model)` picks the body from the model's text tower (`fewclip.families.text_tower`),
so the CoOp line never branches on the family. Bodies:

- `OpenClipTextBody`: open_clip's text transformer (OpenAI, LAION, QuiltNet; the ResNet CLIPs):
  + positions, causal transformer, ln_final, the end token (largest id, or the tower's eos id),
  text_projection (KaiyangZhou/CoOp trainers/coop.py:46-57);
- `BertTextBody`: open_clip's `HFTextEncoder` around a Hugging Face BERT-style encoder
  (BiomedCLIP's PubMedBERT): the encoder on `inputs_embeds` (it adds positions and token types
  and normalises), the padding mask of the token ids, the tower's own pooler
  (CLS, mean, ...) and `proj`;
- `HFClipTextBody`: fewclip's `HFTextTower` around a Hugging Face CLIP text model (PLIP): its own
  forward on the token ids, with the word embeddings replaced by the given ones, then
  `text_projection`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from fewclip.families import text_tower
from fewclip.hf_clip import end_token_positions


class TextBody(ABC):
    """One text tower and its word embedding, as prompt learning runs it."""

    def __init__(self, tower: nn.Module, word_embedding: nn.Embedding) -> None:
        self.tower = tower
        self.word_embedding = word_embedding

    @property
    def width(self) -> int:
        """W, the width of one word embedding (and of a context vector)."""
        return int(self.word_embedding.embedding_dim)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, W) word embeddings (no position added)."""
        return self.word_embedding(tokens)

    @abstractmethod
    def encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, W) embeddings in the place of the word embeddings of `tokens` (N, L) -> (N, D)
        text features, not normalised; `model.encode_text(tokens)` for the tokens' own."""

    @abstractmethod
    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N,) index of each sequence's end token ([SEP] or end-of-text)."""


class OpenClipTextBody(TextBody):
    """open_clip's text transformer: `model.text`, or the CLIP's own text modules."""

    def __init__(self, tower: nn.Module) -> None:
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ValueError(
                f"prompt learning: the {type(tower).__name__} text tower has a class token or a"
                " pad mask, which CoOp, CoCoOp and KgCoOp do not support"
            )
        super().__init__(tower, tower.token_embedding)

    def pooling(self) -> tuple[str, int | None]:
        """(pool type, eos id): a CLIP keeps them as text_pool_type / text_eos_id."""
        tower = self.tower
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        return pool_type, getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))

    def encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool  # here: importing fewclip stays light

        tower = self.tower
        length = tokens.shape[1]
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        mask = tower.attn_mask
        x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        pool_type, eos_id = self.pooling()
        pooled = text_global_pool(tower.ln_final(x), tokens, pool_type, eos_token_id=eos_id)
        projection = tower.text_projection
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled if projection is None else pooled @ projection

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        pool_type, eos_id = self.pooling()
        if pool_type == "eos" and eos_id is not None:
            return (tokens == eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # open_clip's BPE: the end token has the largest id


class BertTextBody(TextBody):
    """open_clip's HFTextEncoder around a BERT-style encoder (`transformer`, `pooler`, `proj`)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__(tower, tower.transformer.get_input_embeddings())

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """0 at the padding, 1 at every other token: HFTextEncoder.forward's mask. The context
        vectors stand in for the "X" words of the ids, so the ids' mask is the prompt's."""
        return (tokens != self.tower.config.pad_token_id).long()

    def encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask(tokens)
        inputs = embeddings.to(self.word_embedding.weight.dtype)
        output = self.tower.transformer(inputs_embeds=inputs, attention_mask=mask)
        return self.tower.proj(self.tower.pooler(output, mask))

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last word before the padding: the [SEP] of "[CLS] ... [SEP] [PAD] ..."."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return (self.attention_mask(tokens) * positions).argmax(dim=-1)


class HFClipTextBody(TextBody):
    """fewclip's HFTextTower: a Hugging Face CLIP text model (`text_model`) + `text_projection`.

    The text model's forward takes token ids only (no `inputs_embeds` in transformers 5), and its
    causal mask and end-token pooling (the first `eos_token_id`, or the largest id for configs
    with eos_token_id 2) change across transformers versions, so `encode` runs that forward
    itself on the token ids and replaces the word embeddings' output with the given embeddings
    (a forward hook, removed after the call): the installed version's mask, positions and pooling
    are used as they are. No padding mask, as in `HFTextTower.forward`: the padding comes after
    the end token, which the causal mask keeps it from reaching."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__(tower, tower.text_model.embeddings.token_embedding)

    def encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        def replace(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return embeddings.to(output.dtype)

        handle = self.word_embedding.register_forward_hook(replace)
        try:
            pooled = self.tower.text_model(input_ids=tokens).pooler_output
        finally:
            handle.remove()
        return self.tower.text_projection(pooled)

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return end_token_positions(self.tower.text_model, tokens)


def text_body(model: nn.Module) -> TextBody:
    """The body of `model`'s text tower; a one-line ValueError naming a tower it cannot run."""
    kind = text_tower(model).kind
    if kind == "hf-bert":
        return BertTextBody(model.text)
    if kind == "hf-clip-text":
        return HFClipTextBody(model.text)
    return OpenClipTextBody(model.text if hasattr(model, "text") else model)
