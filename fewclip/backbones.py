"""Build a CLIP model (open_clip) with its tokenizer, input size and normalisation.

MODEL.NAME picks the architecture: a built-in tiny config (random weights, for tests and demos)
or an open_clip model name. MODEL.PRETRAINED is "" (seeded random init), a local checkpoint file
or an open_clip tag (resolved from the local caches, downloaded only when online). MODEL.HF_HUB
("hf-hub:org/name") takes precedence and is read from the local Hugging Face cache only;
MODEL.NAME "local-dir:PATH" reads an open_clip folder (open_clip_config.json + weights), e.g.
BiomedCLIP's files (timm image tower + Hugging Face text tower, fewclip.families).
Every model comes back with its attention split into q/k/v/out Linears, in eval mode, frozen.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from fewclip.attention import split_attention
from fewclip.checkpoints import (  # noqa: F401 (re-exported: trainers import them from here)
    _file_sha1,
    describe_state_mismatch,
    load_clip_weights,
    read_state_dict,
    split_fused_attention,
)
from fewclip.hf_clip import (
    HF_WEIGHT_FILES,
    HFClip,
    build_hf_clip_architecture,
    hf_clip_tokenizer,
    hf_preprocess,
    is_hf_clip_folder,
)

INIT_SEED = 0  # random-init weights are drawn under this seed, so two builds are identical

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # ViT 64x64, patch 8 (64 tokens + class token), 4 heads of 16; 3.4M parameters, 3.2M of them
    # the text token embedding (open_clip's 49408-token vocabulary)
    "tiny-vit": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 8,
            "width": 64,
            "layers": 2,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    },
}


@dataclass
class ClipBundle:
    model: nn.Module  # open_clip CLIP, attention split into q/k/v/out Linears, eval, frozen
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: str  # architecture + weights: tag, file sha1, hub revision or seeded random init
    # Do the towers share one embedding space? False for a composed model whose projections were
    # never trained together (fewclip_model.json "aligned": false): zero-shot is at chance there
    aligned: bool = True


def build_clip(model_cfg: CfgNode) -> ClipBundle:
    """Build the model named by a MODEL config node (NAME, PRETRAINED, HF_HUB)."""
    # open_clip is imported by the functions that build a model, not at the top: `fewclip
    # --dry-run` and a config error import this module and never build one.
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    aligned = True
    if model_cfg.HF_HUB:
        model, tokenizer, identity = _build_from_hub(model_cfg.HF_HUB)
    elif model_cfg.NAME.startswith(("local-dir:", "twin:")):
        folder = _model_folder(model_cfg.NAME)
        model, tokenizer, identity = _build_local_dir(f"local-dir:{folder}")
        if model_cfg.NAME.startswith("twin:"):  # the same twin wherever the cache lies
            identity = model_cfg.NAME + identity[identity.index(":file-sha1=") :]
        aligned = read_model_notes(folder)
    else:
        model, tokenizer, identity = _build_named(model_cfg.NAME, model_cfg.PRETRAINED)
    split_attention(model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"model {identity} has a non-square input size {tuple(size)}")
        size = size[0]
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        image_size=int(size),
        mean=tuple(float(value) for value in preprocess.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(float(value) for value in preprocess.get("std", OPENAI_DATASET_STD)),
        identity=identity,
        aligned=aligned,
    )


def _model_folder(name: str) -> Path:
    """The folder of MODEL.NAME "local-dir:PATH" or of a tiny twin "twin:FAMILY"."""
    if name.startswith("twin:"):
        from fewclip.defaults import default_cache_dir
        from fewclip.twins import ensure_twin

        return ensure_twin(name[len("twin:") :], default_cache_dir())
    return Path(name[len("local-dir:") :]).expanduser()


MODEL_NOTES_FILE = "fewclip_model.json"  # what a model folder says about itself beyond its config


def read_model_notes(folder: Path) -> bool:
    """`aligned` of a model folder's fewclip_model.json (True when the folder has none)."""
    path = folder / MODEL_NOTES_FILE
    if not path.is_file():
        return True
    try:
        notes = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON object: {error}") from None
    if not isinstance(notes, dict):
        raise ValueError(f"{path} is not a JSON object")
    aligned = notes.get("aligned", True)
    if not isinstance(aligned, bool):
        raise ValueError(f"{path}: 'aligned' must be true or false, not {aligned!r}")
    return aligned


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Run `build` under a fixed seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return build()


def _build_named(name: str, pretrained: str) -> tuple[nn.Module, Callable, str]:
    """Architecture from a tiny config or an open_clip name; weights from PRETRAINED."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if name not in TINY_CONFIGS and name not in open_clip.list_models():
        raise ValueError(
            f"MODEL.NAME {name!r} is neither a built-in tiny config ({', '.join(TINY_CONFIGS)})"
            " nor an open_clip model (see open_clip.list_models())"
        )
    preprocess: dict[str, Any] = {}
    quick_gelu = False
    checkpoint: Path | None = None
    if pretrained and (os.path.isfile(pretrained) or _looks_like_path(pretrained)):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.is_file():
            raise FileNotFoundError(f"MODEL.PRETRAINED checkpoint {checkpoint} does not exist")
    elif pretrained:
        if name in TINY_CONFIGS:
            raise ValueError(
                f"MODEL.PRETRAINED {pretrained!r}: {name} has no tags; give a file path"
            )
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"MODEL.PRETRAINED {pretrained!r} is neither a file nor an open_clip tag of {name}"
                f" (tags: {', '.join(tags) or 'none'})"
            )
        checkpoint = _resolve_tag(name, pretrained, tag_cfg)
        preprocess, quick_gelu = tag_cfg, bool(tag_cfg.get("quick_gelu", False))
    model = _seeded(lambda: _create_architecture(name, quick_gelu, preprocess))
    if checkpoint is None:
        identity = f"{name}:random-init(seed={INIT_SEED})"
    else:
        split_attention(model)  # checkpoints load in split form (fused in_proj keys are converted)
        load_clip_weights(model, checkpoint)
        if preprocess:  # a tag
            identity = f"{name}:{pretrained}"
        else:
            identity = f"{name}:file-sha1={_file_sha1(checkpoint)}"
    if name in TINY_CONFIGS:
        tokenizer = SimpleTokenizer(context_length=TINY_CONFIGS[name]["text_cfg"]["context_length"])
    else:
        tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer, identity


def _create_architecture(name: str, quick_gelu: bool, preprocess: dict[str, Any]) -> nn.Module:
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name]
        model = open_clip.CLIP(**config, quick_gelu=quick_gelu)
        size = config["vision_cfg"]["image_size"]
        final = merge_preprocess_dict(PreprocessCfg(size=size), preprocess)
        open_clip.model.set_model_preprocess_cfg(model, final)
        return model
    model = open_clip.create_model(
        name, force_quick_gelu=quick_gelu, pretrained_image=False, pretrained_text=False
    )
    if preprocess:
        final = merge_preprocess_dict(open_clip.get_model_preprocess_cfg(model), preprocess)
        open_clip.model.set_model_preprocess_cfg(model, final)
    return model


def _resolve_tag(name: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """Local file of an open_clip tag: HF cache, then ~/.cache/clip; download only when online."""
    hub = tag_cfg.get("hf_hub", "")
    url = tag_cfg.get("url", "")
    repo_id = "/".join(hub.split("/")[:2])
    if hub:
        filename = hub[len(repo_id) + 1 :] or "open_clip_pytorch_model.bin"
        stem = filename.rsplit(".", 1)[0]
        for candidate in (stem + ".safetensors", filename, "open_clip_model.safetensors"):
            cached = _hub_cached_file(repo_id, candidate)
            if cached is not None:
                return cached
    if url:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if cached.is_file():
            return cached
    if _offline():
        fetch = (
            f"run `huggingface-cli download {repo_id}` (into HF_HOME)" if hub else f"download {url}"
        )
        raise FileNotFoundError(
            f"weights {name}/{tag} are not in the local cache ({_hub_cache_dir()}, ~/.cache/clip)"
            f" and this machine is offline: on a machine with internet {fetch}, or set"
            " MODEL.PRETRAINED to the checkpoint file"
        )
    import open_clip

    return Path(open_clip.download_pretrained(tag_cfg))


def _build_from_hub(hub_id: str) -> tuple[nn.Module, Callable, str]:
    """An open_clip model published on the Hugging Face hub, read from the local cache only."""
    if not hub_id.startswith("hf-hub:") or hub_id.count("/") != 1:
        raise ValueError(f"MODEL.HF_HUB {hub_id!r} must look like 'hf-hub:org/name'")
    repo_id = hub_id[len("hf-hub:") :]
    config = _hub_cached_file(repo_id, "open_clip_config.json")
    hf_config = _hub_cached_file(repo_id, "config.json")
    if config is None and hf_config is not None and is_hf_clip_folder(hf_config.parent):
        # a Hugging Face CLIPModel repository (PLIP, PubMedCLIP, openai/clip-vit-*)
        model, tokenizer, _ = _build_hf_clip(hf_config.parent, hub_id)
        return model, tokenizer, f"{hub_id}@{hf_config.parent.name}"
    weights = [
        path
        for filename in OPEN_CLIP_WEIGHT_FILES
        if (path := _hub_cached_file(repo_id, filename)) is not None
    ]
    if config is None or not weights:
        raise FileNotFoundError(
            f"{hub_id} is not in the local Hugging Face cache ({_hub_cache_dir()}) as an open_clip"
            " model (open_clip_config.json + weights) or a Hugging Face CLIPModel (config.json +"
            f" weights): on a machine with internet run `huggingface-cli download {repo_id}` and"
            " copy the cache, or set HF_HOME"
        )
    model, tokenizer = _build_from_folder(config.parent, weights[0], hub_id)
    return model, tokenizer, f"{hub_id}@{config.parent.name}"


OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either one makes a Hugging Face tokenizer


def _build_local_dir(name: str) -> tuple[nn.Module, Callable, str]:
    """MODEL.NAME "local-dir:PATH": an open_clip folder (open_clip_config.json + weights)."""
    folder = Path(name[len("local-dir:") :]).expanduser()
    if is_hf_clip_folder(folder):
        return _build_hf_clip(folder, name)
    config = folder / "open_clip_config.json"
    weights = [folder / file for file in OPEN_CLIP_WEIGHT_FILES if (folder / file).is_file()]
    if not config.is_file() or not weights:
        raise FileNotFoundError(
            f"MODEL.NAME {name!r}: {folder} needs open_clip_config.json and one of"
            f" {', '.join(OPEN_CLIP_WEIGHT_FILES)} (an open_clip model), or config.json and one"
            f" of {', '.join(HF_WEIGHT_FILES)} (a Hugging Face CLIPModel): the model's hub files"
        )
    model, tokenizer = _build_from_folder(folder, weights[0], name)
    return model, tokenizer, f"{name}:file-sha1={_file_sha1(weights[0])}"


def _build_hf_clip(folder: Path, name: str) -> tuple[nn.Module, Callable, str]:
    """A Hugging Face CLIPModel folder, wrapped in open_clip's interface (fewclip.hf_clip)."""
    import open_clip

    weights = [folder / file for file in HF_WEIGHT_FILES if (folder / file).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"MODEL.NAME {name!r}: {folder} has config.json but none of"
            f" {', '.join(HF_WEIGHT_FILES)}: put the model's weights file from its hub page there"
        )
    clip = _seeded(lambda: build_hf_clip_architecture(folder))
    expected = clip.state_dict()
    state = read_state_dict(weights[0])
    problems = describe_state_mismatch(state, expected)
    if problems:
        raise ValueError(f"checkpoint {weights[0]} does not fit {folder}/config.json: {problems}")
    clip.load_state_dict(state, strict=True)
    model = HFClip(clip)
    size, mean, std = hf_preprocess(folder, int(clip.config.vision_config.image_size))
    open_clip.model.set_model_preprocess_cfg(model, {"size": size, "mean": mean, "std": std})
    context = int(clip.config.text_config.max_position_embeddings)
    tokenizer = hf_clip_tokenizer(folder, context)
    return model, tokenizer, f"{name}:file-sha1={_file_sha1(weights[0])}"


def _build_from_folder(folder: Path, weights: Path, label: str) -> tuple[nn.Module, Callable]:
    """Architecture and tokenizer from an open_clip folder's config, weights from `weights`."""
    import open_clip

    text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    text_cfg = text_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") and not any(
        (folder / file).is_file() for file in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{label}: the tokenizer is missing from {folder}: put {' or '.join(TOKENIZER_FILES)}"
            " (with tokenizer_config.json) from the text model's hub page there"
        )
    try:
        model = _seeded(
            lambda: open_clip.create_model(
                f"local-dir:{folder}",
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
            )
        )
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as error:  # the towers may need more hub files (e.g. a BERT config)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(f"cannot build {label} from {folder}: {message}") from None
    split_attention(model)
    load_clip_weights(model, weights)
    return model, tokenizer


def _hub_cache_dir() -> Path:
    """The hub cache as the environment names it now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hub_cached_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=_hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def _offline() -> bool:
    """True when downloads are switched off or huggingface.co cannot be reached within 3 s."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(key, "").lower() in ("1", "true", "yes", "on"):
            return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


def _looks_like_path(value: str) -> bool:
    suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
    return os.sep in value or value.startswith(("~", ".")) or value.endswith(suffixes)
