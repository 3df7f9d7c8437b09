"""LoRA on the exact Linear layers of a CLIP's transformer blocks.

The selection (encoder, blocks, projections) comes from the LORA config node as full module
names, so a text-tower name ("transformer.resblocks.0...") never reaches its vision twin
("visual.transformer.resblocks.0..."). Attention must be split (fewclip.attention) first: stock
`nn.MultiheadAttention` runs q, k, v through the functional API, and timm's fused `qkv` would
take one LoRA for q, k and v together. Which Linear a target (q, k, v, out, mlp) names in each
tower comes from the model's family (fewclip.families), the same on every family.

`LoRALinear` is our own layer, not peft's: importing peft (with the transformers modelling and
quantizer modules it loads) cost a one-off run about a second, more than its model compute. It
keeps peft's parameter names (`base_layer.weight`, `lora_A.default.weight`, ...), initialisation,
random-number draws and forward, so adapter files and checkpoints written through peft load
unchanged and a seed gives the same run; tests/test_lora.py checks it against peft 0.21.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from yacs.config import CfgNode

from fewclip.attention import split_attention
from fewclip.families import LORA_TARGET_NAMES, family_of

ENCODERS = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
# LORA.SCALING: alpha / r (LoRA, Hu et al. 2021; peft's default) or alpha / sqrt(r) (rsLoRA,
# peft's use_rslora; CLIP-LoRA's loralib: MaxZanella/CLIP-LoRA loralib/layers.py:42)
SCALINGS = {"alpha_over_r": False, "alpha_over_sqrt_r": True}
ADAPTER = "default"  # the one adapter's key in the parameter names, as peft names it
CONFIG_KEYS = (
    "ENCODER", "LAYERS", "TOP_K", "TARGETS", "RANK", "ALPHA", "DROPOUT", "TEXT_RANK", "SCALING"
)  # fmt: skip
METADATA_KEY = "fewclip_lora_config"


def compute_lora_scaling(alpha: float, rank: int, scaling: str) -> float:
    """The factor s of the LoRA delta, y = W x + s B A x: alpha / r or alpha / sqrt(r)."""
    if scaling not in SCALINGS:
        raise ValueError(f"LORA.SCALING {scaling!r} is not one of {', '.join(SCALINGS)}")
    return alpha / math.sqrt(rank) if SCALINGS[scaling] else alpha / rank


class LoRALinear(nn.Module):
    """y = W x + b + s B A(dropout(x)) around a frozen `nn.Linear` (`base_layer`).

    A (rank, in) is Kaiming-uniform (a = sqrt(5), as nn.Linear and loralib), B (out, rank) zero,
    so the layer starts as its base. A is drawn twice, as peft draws it (its nn.Linear init, then
    `reset_lora_parameters`): the same random stream, so a seed gives the run it gave with peft.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.rank, self.scaling = rank, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        a = nn.Linear(base.in_features, rank, bias=False)
        b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ModuleDict({ADAPTER: a.to(**like)})
        self.lora_B = nn.ModuleDict({ADAPTER: b.to(**like)})

    @property
    def weight(self) -> torch.Tensor:  # code that reads a Linear's weight (its dtype) still can
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        x = x.to(a.weight.dtype)  # no-op unless autocast fed a lower-precision input
        return (result + b(a(self.lora_dropout(x))) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A, (out, in), in the base weight's dtype (computed in fp32 for half on CPU)."""
        a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        half_on_cpu = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        if half_on_cpu:
            a, b = a.float(), b.float()
        return (b @ a * self.scaling).to(self.base_layer.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


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
    ranks = dict.fromkeys(names, lora_cfg.RANK)
    ranks.update(dict.fromkeys(selected.get("text", []), lora_cfg.TEXT_RANK or lora_cfg.RANK))
    training = model.training
    # in the model's module order, as peft injects: the random draws follow the same sequence
    for name in [name for name, _ in model.named_modules() if name in ranks]:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rank = ranks[name]
        layer = LoRALinear(
            getattr(parent, attribute), rank,
            compute_lora_scaling(lora_cfg.ALPHA, rank, scaling), lora_cfg.DROPOUT,
        )  # fmt: skip
        setattr(parent, attribute, layer.train(training))  # LoRA dropout follows the model's mode
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
    wrapped = [
        (name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)
    ]
    for name, module in wrapped:
        with torch.no_grad():
            module.base_layer.weight += module.delta_weight()
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, module.base_layer)
    if hasattr(model, "fewclip_lora_config"):
        del model.fewclip_lora_config


def _is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
