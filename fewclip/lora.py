"""LoRA on the exact Linear layers of open_clip's transformer blocks, through peft.

The selection (encoder, blocks, projections) comes from the LORA config node and is turned into
an anchored regex of full module names: peft matches a *list* of names by suffix, and the text
tower's names ("transformer.resblocks.0...") are suffixes of the vision tower's
("visual.transformer.resblocks.0..."), so a list would leak LoRA into the other encoder.
Attention must be split (fewclip.attention) first: peft 0.21 applies LoRA on
`nn.MultiheadAttention.out_proj` twice, so MultiheadAttention is never targeted, and timm's fused
`qkv` would take one LoRA for q, k and v together. Which Linear a target (q, k, v, out, mlp)
names in each tower comes from the model's family (fewclip.families), the same on every family.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from yacs.config import CfgNode

from fewclip.attention import split_attention
from fewclip.families import LORA_TARGET_NAMES, family_of

ENCODERS = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
# LORA.SCALING -> peft's use_rslora: False = alpha / r (LoRA, Hu et al. 2021), True = alpha /
# sqrt(r) (rsLoRA; CLIP-LoRA's loralib: MaxZanella/CLIP-LoRA loralib/layers.py:42)
SCALINGS = {"alpha_over_r": False, "alpha_over_sqrt_r": True}
CONFIG_KEYS = (
    "ENCODER", "LAYERS", "TOP_K", "TARGETS", "RANK", "ALPHA", "DROPOUT", "TEXT_RANK", "SCALING"
)  # fmt: skip
METADATA_KEY = "fewclip_lora_config"


def compute_lora_scaling(alpha: float, rank: int, scaling: str) -> float:
    """The factor s of the LoRA delta, y = W x + s B A x: alpha / r or alpha / sqrt(r)."""
    if scaling not in SCALINGS:
        raise ValueError(f"LORA.SCALING {scaling!r} is not one of {', '.join(SCALINGS)}")
    return alpha / math.sqrt(rank) if SCALINGS[scaling] else alpha / rank


def select_lora_modules(model: nn.Module, lora_cfg: CfgNode) -> dict[str, list[str]]:
    """Full names of the Linear layers the LORA node selects, per encoder ("vision"/"text")."""
    if lora_cfg.ENCODER not in ENCODERS:
        raise ValueError(f"LORA.ENCODER {lora_cfg.ENCODER!r} is not one of {', '.join(ENCODERS)}")
    unknown = [target for target in lora_cfg.TARGETS if target not in LORA_TARGET_NAMES]
    if unknown or not lora_cfg.TARGETS:
        raise ValueError(
            f"LORA.TARGETS {list(lora_cfg.TARGETS)!r}: pick from {', '.join(LORA_TARGET_NAMES)}"
        )
    if lora_cfg.RANK < 1 or lora_cfg.TEXT_RANK < 0 or lora_cfg.TOP_K < 0:
        raise ValueError(
            f"LORA.RANK must be >= 1 and TEXT_RANK, TOP_K >= 0 "
            f"(got {lora_cfg.RANK}, {lora_cfg.TEXT_RANK}, {lora_cfg.TOP_K})"
        )
    selected: dict[str, list[str]] = {}
    family = family_of(model)
    for encoder in ENCODERS[lora_cfg.ENCODER]:
        tower = family.tower(encoder)
        lacking = [target for target in lora_cfg.TARGETS if target not in tower.targets]
        if lacking:
            raise ValueError(
                f"LORA.TARGETS {lacking}: the {encoder} tower ({tower.kind}) has no such layers"
                f" (it has {', '.join(tower.targets) or 'none: use LORA.ENCODER text'})"
            )
        prefix = tower.blocks
        if not prefix:  # one attention layer, no blocks (the ResNet attention pool)
            if lora_cfg.LAYERS or lora_cfg.TOP_K:
                raise ValueError(
                    f"LORA.LAYERS / TOP_K: the {encoder} tower ({tower.kind}) has no blocks"
                )
            selected[encoder] = [m for target in lora_cfg.TARGETS for m in tower.targets[target]]
            continue
        depth = len(model.get_submodule(prefix))
        if lora_cfg.LAYERS:
            outside = [index for index in lora_cfg.LAYERS if not 0 <= index < depth]
            if outside:
                raise ValueError(
                    f"LORA.LAYERS {outside} out of range for the {encoder} encoder (0..{depth - 1})"
                )
            indices = sorted(set(lora_cfg.LAYERS))
        elif lora_cfg.TOP_K:
            if lora_cfg.TOP_K > depth:
                raise ValueError(
                    f"LORA.TOP_K {lora_cfg.TOP_K} exceeds the {depth} blocks"
                    f" of the {encoder} encoder"
                )
            indices = list(range(depth - lora_cfg.TOP_K, depth))
        else:
            indices = list(range(depth))
        names = [
            f"{prefix}.{index}.{module}"
            for index in indices
            for target in lora_cfg.TARGETS
            for module in tower.targets[target]
        ]
        for name in names:
            if not isinstance(model.get_submodule(name), nn.Linear):
                raise ValueError(f"LoRA target {name} is not an nn.Linear")
        selected[encoder] = names
    return selected


def apply_lora(model: nn.Module, lora_cfg: CfgNode) -> list[str]:
    """Inject LoRA into the selected Linears and freeze every other parameter.

    B starts at zero, so outputs are unchanged until training. Each adapted Linear computes
    W x + s B A(dropout(x)), s = `compute_lora_scaling(ALPHA, rank, SCALING)`, with rank TEXT_RANK
    (0 = RANK) on the text encoder. Returns the names of the LoRA parameters.
    """
    if lora_state_dict(model):
        raise ValueError(
            "apply_lora: the model already has LoRA layers (merge_lora them or build a fresh model)"
        )
    scaling = lora_cfg.get("SCALING", "alpha_over_r")  # adapters saved before the key: alpha/r
    if scaling not in SCALINGS:
        raise ValueError(f"LORA.SCALING {scaling!r} is not one of {', '.join(SCALINGS)}")
    split_attention(model)  # no-op when already split
    selected = select_lora_modules(model, lora_cfg)
    names = [name for encoder_names in selected.values() for name in encoder_names]
    text_rank = lora_cfg.TEXT_RANK or lora_cfg.RANK
    from peft import LoraConfig, inject_adapter_in_model  # here: `fewclip --dry-run` skips peft

    config = LoraConfig(
        r=lora_cfg.RANK,
        lora_alpha=lora_cfg.ALPHA,
        lora_dropout=lora_cfg.DROPOUT,
        target_modules="|".join(re.escape(name) for name in names),  # str = fullmatch in peft
        # peft tries rank patterns as suffixes too; "^" keeps a text name off its vision twin
        rank_pattern={"^" + re.escape(name): text_rank for name in selected.get("text", [])},
        bias="none",
        use_rslora=SCALINGS[scaling],
    )
    training = model.training
    inject_adapter_in_model(config, model)
    model.train(training)  # new LoRA dropouts follow the model's mode
    model.fewclip_lora_config = {
        key: _plain(lora_cfg[key]) for key in CONFIG_KEYS if key in lora_cfg
    }
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_lora_parameter(name))
    return [name for name, _ in model.named_parameters() if _is_lora_parameter(name)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors (A and B of every adapted layer), keyed by full parameter name."""
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if _is_lora_parameter(name)
    }


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write the LoRA tensors to a safetensors file, with the LORA config in its metadata."""
    state = lora_state_dict(model)
    if not state:
        raise ValueError(f"cannot save adapter to {path}: the model has no LoRA layers")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {METADATA_KEY: json.dumps(getattr(model, "fewclip_lora_config", {}))}
    temporary = path.with_name(path.name + ".tmp")
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()}, str(temporary), metadata
    )
    temporary.replace(path)


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load LoRA tensors saved by `save_adapter`; injects LoRA from the file's config if needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    if not lora_state_dict(model):
        if METADATA_KEY not in metadata:
            raise ValueError(
                f"adapter {path} has no LoRA config metadata and the model has no LoRA"
            )
        config = CfgNode(json.loads(metadata[METADATA_KEY]))
        apply_lora(model, config)
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        name for name in expected if name in state and state[name].shape != expected[name].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"adapter {path} does not match the model's LoRA layers: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}"
        )
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA delta into its base Linear and put the plain Linear back in its place."""
    from peft.tuners.lora import LoraLayer

    wrapped = [
        (name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)
    ]
    for name, module in wrapped:
        module.merge()
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, module.get_base_layer())
    if hasattr(model, "fewclip_lora_config"):
        del model.fewclip_lora_config


def _is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
