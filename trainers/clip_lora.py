"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): LoRA on CLIP's attention, cross-entropy on the
scaled cosine logits against the class text features; AdamW with a cosine schedule; iterations =
ITERS_PER_SHOT x shots. Optional: class-balanced samplers and teacher distillation (DISTILL).

Released code (MaxZanella/CLIP-LoRA, docs/methods.md): the class text is one template,
"a photo of a {}.", filled with the class name (lora.py:94-95, datasets/*.py), the logits are
100 * cos (main.py:22, lora.py:112), and training crops are RandomResizedCrop(scale 0.08-1,
bicubic) + flip (main.py:38-43).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.distillation import build_distiller, distill_config_node
from fewclip.features import cached_text_features, compute_text_features
from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.trainer import ImageSet, TrainerBase

CLASS_WORDS = ("class_name", "label")
SOURCE_TEMPLATE = "a photo of a {}."  # CLIP-LoRA datasets/*.py (e.g. datasets/dtd.py:10)


def build_class_texts(
    class_names: list[str], labels: list[str], templates: list[str], words: str
) -> list[list[str]]:
    """Per class, every template filled with the class name ('_' -> ' ', as CLIP-LoRA's
    lora.py:95) or with the prompt file's label: C lists of len(templates) strings."""
    if words not in CLASS_WORDS:
        raise ValueError(
            f"TRAINER.CLIPLORA.CLASS_WORDS {words!r} is not one of {', '.join(CLASS_WORDS)}"
        )
    fills = [name.replace("_", " ") for name in class_names] if words == "class_name" else labels
    return [[template.format(fill) for template in templates] for fill in fills]


@TRAINERS.register()
class CLIPLoRA(TrainerBase):
    """Trainable: the LoRA matrices of the selected encoder(s), layers and projections only."""

    trainable_patterns = (r"\.lora_[AB]\.",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of the class text features
        node.TEMPLATES = [SOURCE_TEMPLATE]  # label-level templates; [] = the prompt file's ensemble
        node.CLASS_WORDS = "class_name"  # what fills {}: "class_name" ('_' -> ' ') or "label"
        node.LOGIT_SCALE = 100.0  # s of the logits s * cos (source: 100); 0 = exp(logit_scale)
        add_sampler_keys(node)
        node.DISTILL = distill_config_node()
        return node

    def build(self) -> None:
        node = self.node
        if node.TEMPLATES and node.PROMPT_LEVEL != "label":
            raise ValueError(
                f"TRAINER.CLIPLORA.PROMPT_LEVEL {node.PROMPT_LEVEL!r} uses the prompt file's "
                "sentences: set TRAINER.CLIPLORA.TEMPLATES [] with it"
            )
        if node.LOGIT_SCALE < 0:
            raise ValueError(f"TRAINER.CLIPLORA.LOGIT_SCALE must be >= 0, not {node.LOGIT_SCALE}")
        if node.CLASS_WORDS not in CLASS_WORDS:
            raise ValueError(
                f"TRAINER.CLIPLORA.CLASS_WORDS {node.CLASS_WORDS!r} is not one of "
                f"{', '.join(CLASS_WORDS)}"
            )
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        self.distiller = build_distiller(node.DISTILL, self.class_names, self.device)

    def class_texts(self) -> list[list[str]]:
        """The texts of each class: TEMPLATES x CLASS_WORDS, or the prompt file's level."""
        if not self.node.TEMPLATES:
            return self.prompt_texts(self.node.PROMPT_LEVEL)
        words = self.node.CLASS_WORDS
        labels = (
            [entry["label"] for entry in self.prompts.classes.values()] if words == "label" else []
        )
        texts = build_class_texts(self.class_names, labels, list(self.node.TEMPLATES), words)
        return self.checked_texts(texts, "TEMPLATES")

    def class_text(self, frozen: bool = False) -> torch.Tensor:
        """(C, D) unit-norm class text features (with gradient while the text LoRA trains)."""
        if frozen:
            return cached_text_features(
                self.clip,
                self.bundle.tokenizer,
                self.class_texts(),
                self.device,
                self.bundle.identity,
                self.cfg.CACHE_DIR or None,
            )
        return compute_text_features(
            self.clip, self.bundle.tokenizer, self.class_texts(), self.device
        )

    def logit_scale(self) -> torch.Tensor | float:
        return self.node.LOGIT_SCALE or self.clip.logit_scale.exp().detach()

    def prepare(self, train: ImageSet) -> None:
        if not self.text_trains:
            self.frozen_text = self.class_text(frozen=True)
        if self.distiller is not None:
            self.distiller.prepare(train, self.cfg.CACHE_DIR)
            self.report["distillation"] = self.distiller.describe()

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(s f T^T, y) (CLIP-LoRA lora.py:112-113) + lambda * distillation when
        DISTILL.SOURCE is set; T is recomputed every step while the text LoRA trains."""
        features = self.compute_image_features(images)
        text = self.class_text() if self.text_trains else self.frozen_text
        logits = (self.logit_scale() * features @ text.t()).float()
        self.batch_logits = logits
        losses = {"cross_entropy": F.cross_entropy(logits, labels)}
        if self.distiller is not None:
            losses["distillation"] = self.distiller.compute_loss(logits, indices)
        return losses

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image features (retrieval metrics use them too)."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def on_eval_start(self) -> None:
        self.eval_text = self.class_text(frozen=not self.text_trains)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.logit_scale() * self.compute_image_features(images) @ self.eval_text.t()
