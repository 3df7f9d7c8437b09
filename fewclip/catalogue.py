"""The model families fewclip runs and the medical models known to load, for `fewclip
--list-models`: how to load each, where to get its files, and which registered trainers apply.

Which trainers apply is worked out from what each trainer declares (`needs_patch_tokens`,
`text_anchor`) against what a family has, not written down per pair; the
families sweep (configs/sweeps/families.yaml, the README's model table) checks it by running.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    patch_tokens: bool  # token-level features (SAVLT's pooling, CaM-VLA's cross-attention)
    aligned: bool  # do the towers share an embedding space as loaded
    lora: str  # what LORA.TARGETS q / k / v / out / mlp adapt
    twin: str  # the tiny twin that tests and the families sweep run ("" = none)
    only: tuple[str, ...] = ()  # the trainers that can use it at all ("" = any that fits)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    load: str  # the config keys
    files: str  # where to get the files on a machine with internet


FAMILIES = (
    FamilyEntry("open_clip ViT", True, True, "attn.{q,k,v,out}_proj, mlp.c_fc/c_proj", "tiny-vit"),
    FamilyEntry(
        "open_clip timm + HF BERT",
        True,
        True,
        "timm attn.qkv split into q/k/v, attn.proj, mlp.fc1/fc2; BERT query/key/value,"
        " attention.output.dense, intermediate.dense/output.dense",
        "twin:timm-hf",
    ),
    FamilyEntry(
        "Hugging Face CLIPModel",
        True,
        True,
        "self_attn.{q,k,v,out}_proj, mlp.fc1/fc2",
        "twin:hf-clip",
    ),
    FamilyEntry(
        "open_clip ResNet",
        False,
        True,
        "attention pool attnpool.{q,k,v,c}_proj (no mlp)",
        "twin:resnet",
    ),
    FamilyEntry(
        "composed timm CNN + HF text (unaligned)",
        False,
        False,
        "text tower as HF BERT (LORA.ENCODER text); a CNN image tower has no Linear to adapt",
        "",
    ),
    FamilyEntry(
        "image-only timm ViT (teacher)",
        True,
        False,
        "qkv split into q/k/v, proj (TRAINER.VITTEACHER)",
        "",
        only=("ViTTeacher",),
    ),
)

HUB = "huggingface-cli download"
KNOWN_MODELS = (
    ModelEntry(
        "BiomedCLIP",
        "open_clip timm + HF BERT",
        "MODEL.HF_HUB hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        f"{HUB} microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 and"
        f" {HUB} microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract (its text config)",
    ),
    ModelEntry(
        "QuiltNet-B-32",
        "open_clip ViT",
        "MODEL.HF_HUB hf-hub:wisdomik/QuiltNet-B-32",
        f"{HUB} wisdomik/QuiltNet-B-32",
    ),
    ModelEntry(
        "OpenAI ViT-B/16",
        "open_clip ViT",
        "MODEL.NAME ViT-B-16 MODEL.PRETRAINED openai",
        f"{HUB} timm/vit_base_patch16_clip_224.openai",
    ),
    ModelEntry(
        "PLIP",
        "Hugging Face CLIPModel",
        "MODEL.HF_HUB hf-hub:vinid/plip (or MODEL.NAME local-dir:/models/plip)",
        f"{HUB} vinid/plip",
    ),
    ModelEntry(
        "PubMedCLIP",
        "Hugging Face CLIPModel",
        "MODEL.HF_HUB hf-hub:flaviagiammarino/pubmed-clip-vit-base-patch32",
        f"{HUB} flaviagiammarino/pubmed-clip-vit-base-patch32",
    ),
    ModelEntry(
        "openai/clip-vit-base-patch16 (SAVLT's loading)",
        "Hugging Face CLIPModel",
        "MODEL.HF_HUB hf-hub:openai/clip-vit-base-patch16",
        f"{HUB} openai/clip-vit-base-patch16",
    ),
    ModelEntry(
        "OpenAI RN50 (AMLPF-CLIP, CaM-VLA)",
        "open_clip ResNet",
        "MODEL.NAME RN50 MODEL.PRETRAINED openai",
        f"{HUB} timm/resnet50_clip.openai",
    ),
    ModelEntry(
        "UNI (ViT-L/16)",
        "image-only timm ViT (teacher)",
        "TRAINER.VITTEACHER.ARCH vit_large_patch16_224 TRAINER.VITTEACHER.WEIGHTS"
        " /models/uni/pytorch_model.bin",
        f"{HUB} MahmoodLab/UNI (gated: accept its licence on the hub first)",
    ),
    ModelEntry(
        "CervixFM (ViT-L/16)",
        "image-only timm ViT (teacher)",
        "TRAINER.VITTEACHER.ARCH vit_large_patch16_224 TRAINER.VITTEACHER.WEIGHTS <checkpoint>",
        "the checkpoint linked from github.com/yehua201826/CervixFM",
    ),
    ModelEntry(
        "tiny twins (random weights, tests and demos)",
        "every family with a twin",
        "MODEL.NAME tiny-vit | twin:timm-hf | twin:hf-clip | twin:resnet",
        "nothing: written on first use into the user cache",
    ),
)


def applicable_trainers(family: FamilyEntry, trainers: Iterable[type]) -> list[str]:
    """Names of the trainers whose declared needs the family meets."""
    names = []
    for trainer in trainers:
        if family.only and trainer.__name__ not in family.only:
            continue
        if getattr(trainer, "needs_patch_tokens", False) and not family.patch_tokens:
            continue
        if getattr(trainer, "text_anchor", "none") == "predicts" and not family.aligned:
            continue
        names.append(trainer.__name__)
    return names


def describe_models(trainers: Iterable[type]) -> str:
    """The text `fewclip --list-models` prints."""
    from tabulate import tabulate

    trainers = list(trainers)
    family_rows = [
        [
            family.name,
            family.twin or "-",
            family.lora,
            ", ".join(applicable_trainers(family, trainers)),
        ]
        for family in FAMILIES
    ]
    model_rows = [[model.name, model.family, model.load, model.files] for model in KNOWN_MODELS]
    return "\n\n".join(
        [
            "Model families (LORA.TARGETS q,k,v,out,mlp mean the same layers in each):",
            tabulate(
                family_rows,
                ["family", "tiny twin", "LoRA targets", "trainers that apply"],
                maxcolwidths=[24, None, 40, 48],
            ),
            "Models known to load (files are read from local caches or folders, never downloaded"
            " at run time):",
            tabulate(
                model_rows,
                ["model", "family", "load with", "get the files"],
                maxcolwidths=[24, 24, 48, 48],
            ),
        ]
    )
