"""ViTTeacher: a supervised ViT image classifier (the teacher of AMLPF-CLIP's distillation and the
CervixFM / UNI evaluation protocol).

The encoder is the open_clip visual tower of MODEL (ARCH "") or a timm architecture (ARCH = a timm
model name), optionally with local weights (WEIGHTS: a UNI- or CervixFM-style state dict). A
linear or MLP head on its pooled (CLS) features is trained: with the encoder (MODE finetune), or
alone on the frozen encoder with a zero-initialised head (MODE linear_probe, CervixFM), or with
LoRA on the encoder's attention (MODE lora: the LORA node's targets, as on any image tower; a
timm ViT's fused qkv split exactly into q, k, v and its proj as out). Its run
folder is a distillation teacher (DISTILL.SOURCE) for CLIP-LoRA and AMLPF.

CervixFM's probe (yehua201826/CervixFM downstream/utils/train.py:99-140) encodes each training
image once, un-augmented, and trains the head on those fixed features: PROBE_AUGMENT none.
`crop_flip` encodes augmented crops every step instead (our variant).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.backbones import describe_state_mismatch, read_state_dict, split_fused_attention
from fewclip.data import Item
from fewclip.features import autocast_context
from fewclip.images import to_model_input
from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.trainer import ImageSet, TrainerBase

LOGGER = logging.getLogger(__name__)
HEADS = ("linear", "mlp")
MODES = ("finetune", "linear_probe", "lora")
PROBE_AUGMENTS = ("none", "crop_flip")
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_head(
    kind: str, dim: int, num_classes: int, hidden: int, dropout: float, zero_init: bool
) -> nn.Module:
    """Linear (D -> C) or MLP (D -> hidden -> GELU -> dropout -> C); zero_init zeroes the last
    layer so every class starts at logit 0 (the CervixFM linear probe)."""
    if kind not in HEADS:
        raise ValueError(f"TRAINER.VITTEACHER.HEAD {kind!r} is not one of {', '.join(HEADS)}")
    if kind == "linear":
        head = nn.Sequential(nn.Linear(dim, num_classes))
    else:
        head = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
    if zero_init:
        nn.init.zeros_(head[-1].weight)
        nn.init.zeros_(head[-1].bias)
    return head


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep a CLIP checkpoint's `visual.` part, strip wrapper prefixes shared by every key."""
    if any(key.startswith("visual.") for key in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return split_fused_attention(state)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local state dict into the encoder; a classifier head in the file is ignored.

    Reads .safetensors / .pt / .bin / .pth (wrapped in state_dict/model, with module. prefixes);
    timm position embeddings are resampled to the configured size by timm's own filter. Any other
    key or shape mismatch is one error naming the file and the first mismatched keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"TRAINER.VITTEACHER.WEIGHTS file {path} does not exist")
    state = clean_state_dict(read_state_dict(path))
    dropped = [key for key in state if key.startswith(("head.", "fc.", "classifier."))]
    state = {key: value for key, value in state.items() if key not in dropped}
    if dropped:
        LOGGER.info("ignoring %d classifier-head tensors of %s", len(dropped), path)
    filter_fn = getattr(sys.modules[type(encoder).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm: resamples pos_embed, converts legacy layouts
        state = filter_fn(state, encoder)
    problems = describe_state_mismatch(state, encoder.state_dict())
    if problems:
        raise ValueError(f"weights {path} do not fit the encoder: {problems}")
    encoder.load_state_dict(state, strict=True)


def build_timm_encoder(name: str, image_size: int) -> tuple[nn.Module, int, tuple, tuple]:
    """A timm model without classifier -> (module, feature dim, mean, std), random init."""
    try:
        import timm
    except ImportError:
        raise ImportError(
            f"TRAINER.VITTEACHER.ARCH {name!r} needs timm (pip install timm)"
        ) from None
    if not timm.is_model(name):
        raise ValueError(f"TRAINER.VITTEACHER.ARCH {name!r} is not a timm model name")
    extra = {"img_size": image_size} if image_size else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
    config = model.pretrained_cfg
    mean, std = config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)
    return model, model.num_features, tuple(mean), tuple(std)


@TRAINERS.register()
class ViTTeacher(TrainerBase):
    """Trainable: the head, plus the whole encoder in MODE finetune or its LoRA tensors in MODE
    lora (nothing of the text tower)."""

    text_anchor = "none"
    trainable_patterns = (r"^encoder\.", r"^head\.")

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.ARCH = ""  # "" = the open_clip visual tower of MODEL, else a timm model name
        node.WEIGHTS = ""  # local state dict for the encoder (UNI/CervixFM style); "" = MODEL's
        node.IMAGE_SIZE = 0  # timm input size (images are resized to it); 0 = the model's
        node.MEAN = []  # input normalisation; [] = the architecture's (CLIP's or timm's)
        node.STD = []
        # "finetune" (encoder + head), "linear_probe" (head only) or "lora" (LoRA of the
        # encoder's attention by the LORA node, as on any image tower, + head)
        node.MODE = "finetune"
        node.HEAD = "mlp"  # "linear" or "mlp"
        node.HIDDEN_DIM = 512  # width of the MLP head
        node.DROPOUT = 0.1  # dropout inside the MLP head
        node.PROBE_AUGMENT = "none"  # linear_probe: "none" (fixed features, CervixFM), "crop_flip"
        node.EPOCHS = 0  # > 0: iterations = EPOCHS x ceil(N / batch) (CervixFM 1000); 0 = OPTIM's
        # with EPOCHS: the cosine's T_max = EPOCHS x N // OPTIM.BATCH_SIZE, as CervixFM's
        # CDetector_train.py:66 (shorter than the run when N < batch: the lr rises again)
        node.SOURCE_T_MAX = False
        add_sampler_keys(node)
        return node

    def build(self) -> None:
        node = self.node
        if node.MODE not in MODES:
            raise ValueError(f"TRAINER.VITTEACHER.MODE {node.MODE!r} is not one of {MODES}")
        if node.PROBE_AUGMENT not in PROBE_AUGMENTS:
            raise ValueError(
                f"TRAINER.VITTEACHER.PROBE_AUGMENT {node.PROBE_AUGMENT!r} is not one of "
                f"{', '.join(PROBE_AUGMENTS)}"
            )
        if node.EPOCHS < 0:
            raise ValueError(f"TRAINER.VITTEACHER.EPOCHS must be >= 0, not {node.EPOCHS}")
        probe_crops = node.MODE == "linear_probe" and node.PROBE_AUGMENT == "crop_flip"
        if probe_crops and self.cfg.INPUT.AUGMENT != "crop_flip":
            raise ValueError(
                "TRAINER.VITTEACHER.PROBE_AUGMENT crop_flip needs INPUT.AUGMENT crop_flip "
                f"(got {self.cfg.INPUT.AUGMENT!r})"
            )
        if node.ARCH:
            encoder, dim, mean, std = build_timm_encoder(node.ARCH, node.IMAGE_SIZE)
            default_size = encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            self.input_size = node.IMAGE_SIZE or default_size
        else:
            encoder = self.clip.visual
            mean, std, self.input_size = self.bundle.mean, self.bundle.std, self.bundle.image_size
            with torch.no_grad():  # the pooled feature width, whatever the tower type
                dim = encoder(torch.zeros(1, 3, self.input_size, self.input_size)).shape[-1]
        if node.WEIGHTS:
            load_encoder_weights(encoder, node.WEIGHTS)
        self.mean, self.std = tuple(node.MEAN or mean), tuple(node.STD or std)
        del self.network["clip"]  # the text tower plays no part
        self.linear_probe = node.MODE == "linear_probe"
        self.fixed_features = self.linear_probe and node.PROBE_AUGMENT == "none"
        self.train_features: torch.Tensor | None = None  # (N, D) when fixed_features
        self.train_size = 0
        encoder.requires_grad_(node.MODE == "finetune")
        if node.MODE == "lora":
            if self.cfg.LORA.ENCODER != "vision":
                raise ValueError(
                    "TRAINER.VITTEACHER.MODE lora adapts the image encoder only: set"
                    f" LORA.ENCODER vision (got {self.cfg.LORA.ENCODER!r})"
                )
            apply_lora(encoder, self.cfg.LORA)  # freezes all but the LoRA tensors
        self.network["encoder"] = encoder
        self.network["head"] = build_head(
            node.HEAD, dim, len(self.class_names), node.HIDDEN_DIM, node.DROPOUT, self.linear_probe
        )

    def input_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised with the encoder's own mean and std (ImageNet's for UNI-style weights)."""
        return to_model_input(batch, self.mean, self.std, self.device, self.cfg.PERF.CHANNELS_LAST)

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled (CLS) encoder features, at the encoder's input size."""
        if images.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.linear_probe:
            self.network["encoder"].eval()  # frozen: no dropout or batch statistics
            with torch.no_grad():
                return self.network["encoder"](images)
        return self.network["encoder"](images)

    def prepare(self, train: ImageSet) -> None:
        """Fixed-feature probe: encode every training image once, un-augmented, in eval mode."""
        self.train_size = len(train)
        if not self.fixed_features:
            return
        batches = []
        with torch.no_grad():
            for start in range(0, len(train), self.cfg.EVAL.BATCH_SIZE):
                images = self.input_tensor(train.images[start : start + self.cfg.EVAL.BATCH_SIZE])
                with autocast_context(self.device, self.cfg.PRECISION):
                    batches.append(self.compute_image_features(images).float())
        self.train_features = torch.cat(batches)

    def num_iterations(self) -> int:
        """OPTIM.MAX_ITERS if set, else EPOCHS x ceil(N / batch) if EPOCHS, else OPTIM's."""
        optim = self.cfg.OPTIM
        if optim.MAX_ITERS or not self.node.EPOCHS:
            return super().num_iterations()
        batch = min(optim.BATCH_SIZE, max(1, self.train_size))
        return self.node.EPOCHS * math.ceil(max(1, self.train_size) / batch)

    def num_cosine_iterations(self, total: int, warmup: int) -> int:
        """SOURCE_T_MAX with EPOCHS: EPOCHS x N // OPTIM.BATCH_SIZE (CervixFM's T_max, from the
        full batch size even when N is smaller); otherwise OPTIM's."""
        if self.node.SOURCE_T_MAX and self.node.EPOCHS and not self.cfg.OPTIM.COSINE_ITERS:
            return max(1, self.node.EPOCHS * self.train_size // self.cfg.OPTIM.BATCH_SIZE)
        return super().num_cosine_iterations(total, warmup)

    def augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """No crops for the fixed-feature probe (its features do not come from these images)."""
        return images if self.fixed_features else super().augment(images, indices)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(head(features), y): plain supervised cross-entropy; the fixed-feature probe reads
        the training features of `indices` computed once in `prepare`."""
        if self.fixed_features:
            rows = torch.as_tensor(np.asarray(indices), device=self.train_features.device)
            features = self.train_features[rows]
        else:
            features = self.compute_image_features(images)
        logits = self.network["head"](features).float()
        self.batch_logits = logits
        return {"cross_entropy": F.cross_entropy(logits, labels)}

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.network["head"](self.compute_image_features(images))
