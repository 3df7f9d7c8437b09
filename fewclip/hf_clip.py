"""Hugging Face `CLIPModel` (PLIP, PubMedCLIP, openai/clip-vit-base-patch16) behind open_clip's
interface: `encode_image`, `encode_text`, `logit_scale`, `visual` (with `image_size`), `text`.

A local folder in Hugging Face format (config.json with model_type "clip", model.safetensors or
pytorch_model.bin, the tokenizer's vocab.json + merges.txt, optionally preprocessor_config.json)
loads with MODEL.NAME "local-dir:<folder>". The towers keep Hugging Face's module names, so LoRA
targets `self_attn.q_proj`, `k_proj`, `v_proj`, `out_proj` (fewclip.families).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class HFVisionTower(nn.Module):
    """CLIP vision transformer + `head` (the visual projection): images (B, 3, S, S) -> (B, D)."""

    def __init__(self, vision_model: nn.Module, projection: nn.Linear, image_size: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.head = projection
        self.image_size = (image_size, image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_model(pixel_values=images).pooler_output)


class HFTextTower(nn.Module):
    """CLIP text transformer + `text_projection`: token ids (B, L) -> (B, D)."""

    def __init__(self, text_model: nn.Module, projection: nn.Linear) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids=text).pooler_output)


def end_token_positions(text_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) ids -> (N,) index of the token a Hugging Face CLIP text model pools, as its forward
    picks it: the first `eos_token_id` (the padding may be the end token too), or the largest id
    for configs from before transformers PR 24773 (eos_token_id 2)."""
    if text_model.eos_token_id == 2:
        return tokens.argmax(dim=-1)
    return (tokens == text_model.eos_token_id).int().argmax(dim=-1)


class HFClip(nn.Module):
    """A Hugging Face CLIPModel with open_clip's calls; its parameters are the CLIPModel's."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        size = int(clip.config.vision_config.image_size)
        self.visual = HFVisionTower(clip.vision_model, clip.visual_projection, size)
        self.text = HFTextTower(clip.text_model, clip.text_projection)
        self.logit_scale = clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        return nn.functional.normalize(features, dim=-1) if normalize else features


def is_hf_clip_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"


def build_hf_clip_architecture(folder: Path) -> nn.Module:
    """The CLIPModel of `folder`'s config.json with random weights (the caller seeds and loads)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    return CLIPModel(config).eval()


def hf_clip_tokenizer(folder: Path, context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """The folder's CLIP tokenizer as open_clip's call: texts -> (B, context_length) ids,
    truncated (with the end token kept) and padded with the pad token."""
    missing = [file for file in HF_TOKENIZER_FILES if not (folder / file).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the tokenizer is missing from {folder}: put {' and '.join(missing)} (or"
            " tokenizer.json) from the model's hub page there"
        )
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

    def tokenize(texts: list[str] | str, context_length: int = context_length) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )
        return encoded["input_ids"]

    return tokenize


def hf_preprocess(folder: Path, image_size: int) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) from preprocessor_config.json; CLIP's own values without it."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return image_size, OPENAI_MEAN, OPENAI_STD
    data = json.loads(path.read_text())
    crop = data.get("crop_size", image_size)
    size = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    mean = tuple(float(value) for value in data.get("image_mean", OPENAI_MEAN))
    std = tuple(float(value) for value in data.get("image_std", OPENAI_STD))
    return int(size), mean, std
