"""Which model family a CLIP is, and what each of its towers offers: one adapter per tower kind.

Trainers never branch on the family: they ask `family_of(model)` for the blocks LoRA may adapt
(with the Linear layer each `LORA.TARGETS` name means in that tower), and `image_feature_dim`
for the width of `model.encode_image`. Supported towers:

- open_clip `VisionTransformer` / text transformer (OpenAI, LAION, QuiltNet ViTs), attention
  split into q_proj, k_proj, v_proj, out_proj by fewclip.attention;
- open_clip `TimmModel` with a timm ViT trunk (BiomedCLIP's image tower), its fused `qkv`
  split into q_proj, k_proj, v_proj and `proj` as out;
- open_clip `TimmModel` with a convolutional timm trunk (no Linear layer: EfficientNet, ResNet;
  fewclip.compose): no LoRA targets, so LoRA goes on the text tower only (`LORA.ENCODER text`);
- open_clip `HFTextEncoder` with a BERT-style encoder (BiomedCLIP's PubMedBERT): `query`,
  `key`, `value`, `attention.output.dense`;
- open_clip `ModifiedResNet` (OpenAI RN50): LoRA on the attention pool's q_proj, k_proj,
  v_proj and c_proj (out); the convolutions train fully or stay frozen; no patch tokens;
- Hugging Face `CLIPModel` towers (PLIP, openai/clip-vit-base-patch16; fewclip.hf_clip):
  `self_attn.q_proj`, `k_proj`, `v_proj`, `out_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LORA_TARGET_NAMES = ("q", "k", "v", "out", "mlp")


@dataclass(frozen=True)
class Tower:
    """One encoder of a model: where its blocks are and the Linear each LoRA target names."""

    kind: str  # "open_clip-vit", "open_clip-text", "timm-vit", "timm-cnn", "hf-bert"
    blocks: str  # full name of the ModuleList of blocks; "" = targets are full names (no blocks)
    targets: dict[str, tuple[str, ...]]  # LORA.TARGETS name -> module names inside one block


OPEN_CLIP_TARGETS = {
    "q": ("attn.q_proj",),
    "k": ("attn.k_proj",),
    "v": ("attn.v_proj",),
    "out": ("attn.out_proj",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}
TIMM_VIT_TARGETS = {
    "q": ("attn.q_proj",),
    "k": ("attn.k_proj",),
    "v": ("attn.v_proj",),
    "out": ("attn.proj",),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
HF_CLIP_TARGETS = {
    "q": ("self_attn.q_proj",),
    "k": ("self_attn.k_proj",),
    "v": ("self_attn.v_proj",),
    "out": ("self_attn.out_proj",),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
RESNET_TARGETS = {  # names inside the image tower; the attention pool has no blocks
    "q": ("attnpool.q_proj",),
    "k": ("attnpool.k_proj",),
    "v": ("attnpool.v_proj",),
    "out": ("attnpool.c_proj",),
}
BERT_TARGETS = {
    "q": ("attention.self.query",),
    "k": ("attention.self.key",),
    "v": ("attention.self.value",),
    "out": ("attention.output.dense",),
    "mlp": ("intermediate.dense", "output.dense"),
}


@dataclass(frozen=True)
class Family:
    """The towers of one model, keyed by encoder ("vision", "text")."""

    name: str
    towers: dict[str, Tower]

    def tower(self, encoder: str) -> Tower:
        if encoder not in self.towers:
            raise ValueError(f"{self.name} has no {encoder} tower")
        return self.towers[encoder]


def family_of(model: nn.Module) -> Family:
    """The family adapter of an open_clip CLIP / CustomTextCLIP, or of an image encoder alone
    (a ViT teacher's timm ViT or a CLIP's visual tower: one "vision" tower); a one-line error
    for a tower fewclip does not know."""
    if not hasattr(model, "visual"):
        vision = _vision_tower(model, "")
        return Family(name=f"{vision.kind} (image only)", towers={"vision": vision})
    towers = {"vision": _vision_tower(model.visual, "visual."), "text": text_tower(model)}
    name = f"{towers['vision'].kind} + {towers['text'].kind}"
    return Family(name=name, towers=towers)


def _vision_tower(visual: nn.Module, prefix: str) -> Tower:
    """The tower of image encoder `visual`, its module names under `prefix` ("visual." in a
    CLIP, "" for the encoder alone)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    from fewclip.hf_clip import HFVisionTower

    if isinstance(visual, HFVisionTower):
        return Tower("hf-clip-vision", f"{prefix}vision_model.encoder.layers", HF_CLIP_TARGETS)
    if isinstance(visual, ModifiedResNet):
        targets = {key: (f"{prefix}{name}",) for key, (name,) in RESNET_TARGETS.items()}
        return Tower("open_clip-resnet", "", targets)
    if isinstance(visual, VisionTransformer):
        return Tower("open_clip-vit", f"{prefix}transformer.resblocks", OPEN_CLIP_TARGETS)
    trunk, trunk_prefix = (
        (visual.trunk, "trunk.") if isinstance(visual, TimmModel) else (visual, "")
    )
    blocks = getattr(trunk, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        if hasattr(getattr(blocks[0], "attn", None), "proj"):
            return Tower("timm-vit", f"{prefix}{trunk_prefix}blocks", TIMM_VIT_TARGETS)
    if isinstance(visual, TimmModel) and not any(
        isinstance(module, nn.Linear) for module in visual.trunk.modules()
    ):
        return Tower("timm-cnn", "", {})  # LoRA adapts Linear layers: a CNN trunk has none
    raise ValueError(
        f"unsupported image tower {type(visual).__name__}: fewclip supports open_clip ViTs and"
        " ResNets, timm ViTs and CNNs and Hugging Face CLIP vision towers (see"
        " fewclip/families.py)"
    )


def text_tower(model: nn.Module) -> Tower:
    """The adapter of the text tower alone (prompt learning needs no image tower's)."""
    from open_clip.hf_model import HFTextEncoder

    from fewclip.hf_clip import HFTextTower

    text = getattr(model, "text", None)
    if isinstance(text, HFTextTower):
        return Tower("hf-clip-text", "text.text_model.encoder.layers", HF_CLIP_TARGETS)
    if text is None and hasattr(model, "transformer"):  # open_clip CLIP keeps the text inline
        return Tower("open_clip-text", "transformer.resblocks", OPEN_CLIP_TARGETS)
    name = type(text).__name__
    if isinstance(text, HFTextEncoder):
        encoder = getattr(text.transformer, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if layers is not None and hasattr(layers[0].attention, "self"):
            return Tower("hf-bert", "text.transformer.encoder.layer", BERT_TARGETS)
        name = f"{name} ({type(text.transformer).__name__})"
    elif text is not None and hasattr(text, "transformer") and hasattr(text, "token_embedding"):
        return Tower("open_clip-text", "text.transformer.resblocks", OPEN_CLIP_TARGETS)
    raise ValueError(
        f"unsupported text tower {name}: fewclip supports open_clip text transformers, Hugging"
        " Face BERT encoders and Hugging Face CLIP text models (see fewclip/families.py)"
    )


def image_feature_dim(model: nn.Module) -> int:
    """Width D of `model.encode_image` output. open_clip's own towers (VisionTransformer,
    ModifiedResNet) declare it as `output_dim`, the width their forward returns; any other tower
    (timm, Hugging Face) is measured by one forward of a blank image at its input size, so no
    family needs an attribute another happens to have (and a dataset image is never encoded
    twice just to learn a width)."""
    visual = model.visual
    declared = getattr(visual, "output_dim", None)
    if type(visual).__module__.startswith("open_clip.") and isinstance(declared, int):
        return declared
    size = getattr(visual, "image_size", 224)
    rows, columns = (size, size) if isinstance(size, int) else tuple(size)
    parameter = next(model.parameters())
    blank = torch.zeros(1, 3, rows, columns, device=parameter.device, dtype=parameter.dtype)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model.encode_image(blank).shape[-1])
    finally:
        model.train(training)
