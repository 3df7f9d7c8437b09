"""Tiny twins of the model families, written to disk in each family's own file format.

A twin has the architecture of a real family at toy size and seeded random weights, so tests and
demos load it through exactly the path a user's downloaded model takes (no network):

- `write_timm_hf_twin(folder)`: BiomedCLIP's layout, an open_clip folder (open_clip_config.json,
  open_clip_model.safetensors, the BERT tokenizer files) with a timm ViT image tower (timm's
  registered `test_vit`: width 64, 6 blocks, 2 heads, patch 16, at 64x64 input) and a Hugging
  Face BERT text tower (width 32, 2 layers) whose config.json lies in `folder/text`.
  Load it with MODEL.NAME "local-dir:<folder>".
- `write_hf_clip_twin(folder)`: PLIP's layout, a Hugging Face CLIPModel folder.
- `write_resnet_twin(folder)`: an open_clip folder of a ResNet CLIP (RN50's layout, one
  bottleneck per stage, width 8, 64x64 input) with the open_clip text transformer.

- `write_bert_model(folder)`: a Hugging Face BERT encoder folder of that width, with weights:
  the text model `fewclip.compose.write_composed_model` takes.

MODEL.NAME "twin:timm-hf" / "twin:hf-clip" / "twin:resnet" writes the twin once into the user
cache (`ensure_twin`) and loads it from there like any local folder: sweeps and the demo run
every family by name.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

TWIN_SEED = 0
TWIN_WORDS = (
    "a photo of an image showing tissue cell cells normal abnormal class squamous cervical"
    " high low grade lesion carcinoma benign malignant intraepithelial metaplasia inflammation"
).split()


def write_bert_tokenizer(folder: Path) -> None:
    """A word-level BERT vocabulary over TWIN_WORDS plus the letters (for unseen words)."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    subwords = ["##" + letter for letter in letters]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = list(dict.fromkeys([*specials, *TWIN_WORDS, *letters, *subwords, ".", ","]))
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))


# The layout at toy size (tests) and at the real models' size (benchmarks: BiomedCLIP's ViT-B/16 +
# BERT-base, openai/clip-vit-base-patch16, RN50), all with seeded random weights.
TIMM_HF_SIZES = {
    "tiny": {"timm": "test_vit", "image": 64, "embed": 32, "width": 32, "layers": 2, "heads": 2,
             "context": 32},
    "base": {"timm": "vit_base_patch16_224", "image": 224, "embed": 512, "width": 768,
             "layers": 12, "heads": 12, "context": 256},
}  # fmt: skip
HF_CLIP_SIZES = {  # vision, text: (width, layers, heads)
    "tiny": {
        "vision": (32, 2, 2),
        "text": (32, 2, 2),
        "patch": 8,
        "image": 32,
        "embed": 16,
        "context": 32,
    },
    "base": {
        "vision": (768, 12, 12),
        "text": (512, 12, 8),
        "patch": 16,
        "image": 224,
        "embed": 512,
        "context": 77,
    },
}
RESNET_SIZES = {
    "tiny": {"layers": [1, 1, 1, 1], "width": 8, "image": 64, "head_width": 8, "embed": 32,
             "text": (32, 2, 2)},
    "base": {"layers": [3, 4, 6, 3], "width": 64, "image": 224, "head_width": 64, "embed": 1024,
             "text": (512, 12, 8)},
}  # fmt: skip


def bert_config(tokenizer_folder: Path, shape: dict):
    """A BERT config of a TIMM_HF_SIZES shape over the tokenizer folder's vocabulary."""
    from transformers import BertConfig

    vocabulary = (tokenizer_folder / "vocab.txt").read_text().split()
    return BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=shape["width"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=(2 if shape["width"] < 256 else 4) * shape["width"],
        max_position_embeddings=max(64, shape["context"]),
        pad_token_id=0,
    )


def write_bert_model(folder: str | Path) -> Path:
    """A tiny Hugging Face BERT encoder folder (config.json, model.safetensors, tokenizer) with
    seeded random weights: a stand-in for a pretrained text model (fewclip.compose)."""
    from transformers import BertModel

    folder = Path(folder)
    write_bert_tokenizer(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = BertModel(bert_config(folder, TIMM_HF_SIZES["tiny"]), add_pooling_layer=False)
    model.save_pretrained(str(folder))
    return folder


def write_timm_hf_twin(folder: str | Path, size: str = "tiny") -> Path:
    """Write a BiomedCLIP-shaped twin into `folder` (see the module docstring); returns it."""
    import open_clip
    from safetensors.torch import save_file

    shape = TIMM_HF_SIZES[size]
    folder = Path(folder)
    text_folder = folder / "text"
    text_folder.mkdir(parents=True, exist_ok=True)
    write_bert_tokenizer(text_folder)
    write_bert_tokenizer(folder)  # open_clip reads a local folder's tokenizer from the folder
    bert_config(text_folder, shape).save_pretrained(str(text_folder))
    config = {
        "model_cfg": {
            "embed_dim": shape["embed"],
            "vision_cfg": {
                "timm_model_name": shape["timm"],
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": shape["image"],
            },
            "text_cfg": {
                "hf_model_name": str(text_folder),
                "hf_tokenizer_name": str(text_folder),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": shape["context"],
            },
        },
        "preprocess_cfg": {  # BiomedCLIP's: OpenAI's mean and std
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = open_clip.create_model(
            f"local-dir:{folder}", load_weights=False, pretrained_image=False, pretrained_text=False
        )
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def write_clip_bpe_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer (vocab.json, merges.txt); returns the end token id."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)] + [".", ","]
    symbols = [*letters, *(letter + "</w>" for letter in letters)]
    vocabulary = {token: index for index, token in enumerate(symbols)}
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    (folder / "vocab.json").write_text(json.dumps(vocabulary))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(
        str(folder)
    )
    return vocabulary["<|endoftext|>"]


def write_hf_clip_twin(folder: str | Path, size: str = "tiny") -> Path:
    """Write a Hugging Face CLIPModel twin (PLIP's layout: config.json, model.safetensors,
    vocab.json, merges.txt); tiny: ViT width 32, 2 layers, patch 8 at 32x32, text width 32, 2
    layers, context 32 (room for CoOp's 16 context vectors and a class name in the tokenizer's
    letters); base: openai/clip-vit-base-patch16's shapes. Load it with MODEL.NAME
    "local-dir:<folder>"."""
    from transformers import CLIPConfig, CLIPModel

    shape = HF_CLIP_SIZES[size]
    folder = Path(folder)
    end_id = write_clip_bpe_tokenizer(folder)

    def tower(width: int, layers: int, heads: int) -> dict:
        return {
            "hidden_size": width,
            "intermediate_size": (2 if size == "tiny" else 4) * width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
        }

    config = CLIPConfig(
        text_config={
            **tower(*shape["text"]),
            "vocab_size": end_id + 1,
            "max_position_embeddings": shape["context"],
            "bos_token_id": end_id - 1,
            "eos_token_id": end_id,
            "pad_token_id": end_id,
        },
        vision_config={
            **tower(*shape["vision"]),
            "image_size": shape["image"],
            "patch_size": shape["patch"],
        },
        projection_dim=shape["embed"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = CLIPModel(config)
    model.save_pretrained(str(folder))
    return folder


def write_resnet_twin(folder: str | Path, size: str = "tiny") -> Path:
    """Write an open_clip ResNet CLIP folder (see the module docstring; base: RN50's shapes)."""
    import open_clip
    from safetensors.torch import save_file

    shape = RESNET_SIZES[size]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, layers, heads = shape["text"]
    model_cfg = {
        "embed_dim": shape["embed"],
        "vision_cfg": {
            "layers": shape["layers"],
            "width": shape["width"],
            "image_size": shape["image"],
            "head_width": shape["head_width"],
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": shape["image"]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = open_clip.CLIP(**model_cfg)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


TWINS: dict[str, Callable[[Path], Path]] = {
    "timm-hf": write_timm_hf_twin,
    "hf-clip": write_hf_clip_twin,
    "resnet": write_resnet_twin,
    # the real models' sizes, for the benchmark (hundreds of MB each)
    "timm-hf-base": functools.partial(write_timm_hf_twin, size="base"),
    "hf-clip-base": functools.partial(write_hf_clip_twin, size="base"),
    "resnet-base": functools.partial(write_resnet_twin, size="base"),
}
COMPLETE = "twin-complete"  # written last: a folder without it is a write that did not finish


def ensure_twin(name: str, cache_dir: str | Path) -> Path:
    """The folder of twin `name` under `cache_dir/twins/`, written once (under a file lock, so
    parallel sweep workers write it once) and keyed by this module's source: a changed twin
    writer writes a new folder."""
    if name not in TWINS:
        raise ValueError(
            f"MODEL.NAME 'twin:{name}': no such twin; choose one of {', '.join(TWINS)}"
        )
    version = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:10]
    root = Path(cache_dir).expanduser() / "twins"
    folder = root / f"{name}-{version}"
    if (folder / COMPLETE).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            TWINS[name](folder)
            (folder / COMPLETE).write_text("")
    return folder
