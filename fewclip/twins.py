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
"""

from __future__ import annotations

import json
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


def tiny_bert_config(tokenizer_folder: Path):
    """A BERT config (width 32, 2 layers, 2 heads, 64 positions) over the folder's vocabulary."""
    from transformers import BertConfig

    vocabulary = (tokenizer_folder / "vocab.txt").read_text().split()
    return BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
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
        model = BertModel(tiny_bert_config(folder), add_pooling_layer=False)
    model.save_pretrained(str(folder))
    return folder


def write_timm_hf_twin(folder: str | Path, embed_dim: int = 32) -> Path:
    """Write a BiomedCLIP-shaped twin into `folder` (see the module docstring); returns it."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    text_folder = folder / "text"
    text_folder.mkdir(parents=True, exist_ok=True)
    write_bert_tokenizer(text_folder)
    write_bert_tokenizer(folder)  # open_clip reads a local folder's tokenizer from the folder
    tiny_bert_config(text_folder).save_pretrained(str(text_folder))
    config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 64,
            },
            "text_cfg": {
                "hf_model_name": str(text_folder),
                "hf_tokenizer_name": str(text_folder),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 32,
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


def write_hf_clip_twin(folder: str | Path, embed_dim: int = 16) -> Path:
    """Write a Hugging Face CLIPModel twin (PLIP's layout: config.json, model.safetensors,
    vocab.json, merges.txt): ViT width 32, 2 layers, patch 8 at 32x32; text width 32, 2
    layers, context 16. Load it with MODEL.NAME "local-dir:<folder>"."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    end_id = write_clip_bpe_tokenizer(folder)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": 2,
            "vocab_size": end_id + 1,
            "max_position_embeddings": 16,
            "bos_token_id": end_id - 1,
            "eos_token_id": end_id,
            "pad_token_id": end_id,
        },
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=embed_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = CLIPModel(config)
    model.save_pretrained(str(folder))
    return folder


def write_resnet_twin(folder: str | Path) -> Path:
    """Write a tiny open_clip ResNet CLIP folder (see the module docstring); returns it."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2},
    }  # fmt: skip
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": 64}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TWIN_SEED)
        model = open_clip.CLIP(**model_cfg)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
