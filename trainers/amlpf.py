"""AMLPF-CLIP (adaptive multi-level prompt fusion, histopathology; Xizhang-Yao/AMLPF-CLIP).

Class texts at three levels (the bare class word, a short sentence, a morphological description)
give three frozen text classifiers; the student's image features are scored against each and the
level logits are fused with learnable raw weights (fewclip.fusion; models.py:40, 151). The
student scores 8 windows cut at the image's stored resolution plus the full image
(fewclip.multiview), in training and at test; the loss is CE + || softmax(student) -
softmax(teacher) ||_F with the ViT teacher on the same views (models.py:183-185, main.py:418);
the training draw is difficulty-aware resampling (fewclip.samplers, main.py:384-407).
docs/methods.md lists every item with its source line and our named options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.augment import augment_batch
from fewclip.data import Item
from fewclip.distillation import (
    DISTILL_LOSSES,
    build_distiller,
    compute_distillation_loss,
    distill_config_node,
)
from fewclip.fusion import PromptFusion, compute_level_logits
from fewclip.images import ImageRows, ImageStore, check_store_size
from fewclip.lora import apply_lora
from fewclip.multiview import (
    build_views,
    check_multiview_node,
    combine_view_logits,
    compute_multiview_logits,
    multiview_config_node,
    resize_to_input,
)
from fewclip.prompts import TEXT_LEVELS
from fewclip.registry import TRAINERS
from fewclip.samplers import SOURCE_DIFFICULTY, add_sampler_keys, check_sampler_node
from fewclip.trainer import ImageSet, TrainerBase

STUDENTS = ("full", "lora")
LOGIT_SCALES = ("learned", "clamped", "frozen")
DISTILL_VIEWS = ("same", "cached")


class LogitScale(nn.Module):
    """A learnable log scale s = exp(logit_scale), clamped to at most `maximum` (inf = not
    clamped, as the released code, models.py:53, 138). Named `logit_scale` and 0-d, so the
    loop never weight-decays it."""

    def __init__(self, initial: float, maximum: float = math.inf) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(initial)))
        self.maximum = maximum

    def forward(self) -> torch.Tensor:
        if math.isinf(self.maximum):
            return self.logit_scale.exp()
        return self.logit_scale.clamp(max=math.log(self.maximum)).exp()


def _channels(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(tuple(values), device=device).view(-1, 1, 1)


def _choice(node: CfgNode, key: str, choices: tuple[str, ...]) -> None:
    if node[key] not in choices:
        raise ValueError(f"TRAINER.AMLPF.{key} {node[key]!r} is not one of {', '.join(choices)}")


@TRAINERS.register()
class AMLPF(TrainerBase):
    """Trainable: the whole visual encoder (STUDENT full) or its LoRA matrices (STUDENT lora),
    the fusion weights, and the logit scale unless LOGIT_SCALE is frozen."""

    takes_stored_images = True  # windows are cut from the stored image (INPUT.STORE_SIZE)
    trainable_patterns = (r"^clip\.visual\.", r"^fusion\.weights$", r"^scale\.logit_scale$")

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.LEVELS = ["word", "short", "description"]  # fused prompt levels (word, label, ...)
        node.FUSION = "raw"  # "raw" (unconstrained weights, init 1) or "softmax" (sum to 1)
        node.STUDENT = "full"  # "full" (visual fine-tuning) or "lora" (LORA node, vision)
        node.LOGIT_SCALE = "learned"  # learned (CLIP's, trained) | clamped (<= MAX_SCALE) | frozen
        node.MAX_SCALE = 100.0  # upper bound of the clamped logit scale
        add_sampler_keys(node, "difficulty", **SOURCE_DIFFICULTY)
        node.DISTILL = distill_config_node()
        node.DISTILL.LOSS = "source_frobenius"
        node.DISTILL_VIEWS = "same"  # teacher on the student's views each step | "cached" once
        node.MULTIVIEW = multiview_config_node()
        return node

    def build(self) -> None:
        node = self.node
        for key, choices in (
            ("STUDENT", STUDENTS),
            ("LOGIT_SCALE", LOGIT_SCALES),
            ("DISTILL_VIEWS", DISTILL_VIEWS),
        ):
            _choice(node, key, choices)
        unknown = [level for level in node.LEVELS if level not in TEXT_LEVELS]
        if unknown or not node.LEVELS:
            raise ValueError(
                f"TRAINER.AMLPF.LEVELS {list(node.LEVELS)} must be non-empty, each one of "
                f"{', '.join(TEXT_LEVELS)}"
            )
        if node.DISTILL.LOSS not in DISTILL_LOSSES:  # checked with or without a teacher
            raise ValueError(
                f"TRAINER.AMLPF.DISTILL.LOSS {node.DISTILL.LOSS!r} is not one of "
                f"{', '.join(DISTILL_LOSSES)}"
            )
        check_multiview_node(node.MULTIVIEW, "TRAINER.AMLPF.MULTIVIEW")
        check_sampler_node(node, "TRAINER.AMLPF")
        self.input_size = self.bundle.image_size
        self.stored_size = check_store_size(self.cfg.INPUT.STORE_SIZE, self.input_size)
        if node.STUDENT == "lora":
            if self.cfg.LORA.ENCODER != "vision":
                raise ValueError(
                    "AMLPF caches its text features: set LORA.ENCODER vision "
                    f"(got {self.cfg.LORA.ENCODER!r})"
                )
            apply_lora(self.clip, self.cfg.LORA)
        else:
            self.clip.visual.requires_grad_(True)
        self.network["fusion"] = PromptFusion(len(node.LEVELS), node.FUSION)
        if node.LOGIT_SCALE != "frozen":
            maximum = node.MAX_SCALE if node.LOGIT_SCALE == "clamped" else math.inf
            self.network["scale"] = LogitScale(float(self.clip.logit_scale), maximum)
        self.distiller = build_distiller(node.DISTILL, self.class_names, self.device)
        self.teacher = None
        if self.distiller is not None and node.DISTILL_VIEWS == "same":
            if self.distiller.from_file:
                raise ValueError(
                    "TRAINER.AMLPF.DISTILL_VIEWS same runs the teacher on each step's views: "
                    "DISTILL.SOURCE must be a run folder, not an .npz (or use cached)"
                )
            self.teacher = self.distiller.teacher
            self.teacher.network.eval().requires_grad_(False)
        self.level_text: torch.Tensor | None = None
        self.native_stores: dict[tuple[str, ...], ImageStore] = {}

    # ----- text, logits ---------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        if "scale" in self.network:
            return self.network["scale"]()
        return self.clip.logit_scale.exp().detach()

    def cached_level_text(self) -> torch.Tensor:
        """(K, C, D) class text features per level, computed once (the text encoder is frozen)."""
        if self.level_text is None:
            self.level_text = torch.stack(
                [self.frozen_text_features(level) for level in self.node.LEVELS]
            )
        return self.level_text

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image features of the student."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def fused_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) = sum_k w_k s f T_k^T for model-input images (B, 3, s, s)."""
        features = self.compute_image_features(images)
        level_logits = compute_level_logits(features, self.cached_level_text(), self.scale())
        return self.network["fusion"](level_logits)

    def views(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        """(B, V, 3, s, s) views of stored-size images: windows + full (V = WINDOWS + 1) where
        MULTIVIEW.MODE asks for them, else the one deterministic resize (V = 1)."""
        mode = self.node.MULTIVIEW.MODE
        if mode == "source" or (mode == "test_only" and not training):
            generator = self.generator if training else None
            return build_views(images, self.node.MULTIVIEW, self.input_size, generator)
        return resize_to_input(images, self.input_size)[:, None]

    def view_logits(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        views = self.views(images, training)
        if views.shape[1] == 1:
            return self.fused_logits(views[:, 0])
        return compute_multiview_logits(self.fused_logits, views)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.view_logits(images, training=False)

    # ----- training ---------------------------------------------------------------------------
    def augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """MULTIVIEW source: the source's RandomHorizontalFlip only (utils.py:74; the random
        windows are its crops). Otherwise a random resized crop of the stored image, sampled at
        the model input, and a flip."""
        if self.node.MULTIVIEW.MODE != "source":
            scale = self.cfg.INPUT.CROP_SCALE
            return augment_batch(images, self.generator, scale, self.input_size)
        flip = torch.rand(images.shape[0], generator=self.generator) < 0.5
        return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)

    def teacher_logits(self, views: torch.Tensor) -> torch.Tensor:
        """(B, C) teacher logits of the student's views (B, V, 3, s, s), re-normalised to the
        teacher's mean and std and combined like the student's (models.py:31, 183-184)."""
        teacher = self.teacher
        mean_s, std_s = (_channels(v, views.device) for v in (self.bundle.mean, self.bundle.std))
        mean_t, std_t = (
            _channels(getattr(teacher, key, getattr(teacher.bundle, key)), views.device)
            for key in ("mean", "std")
        )
        with torch.no_grad():
            flat = ((views.flatten(0, 1) * std_s + mean_s) - mean_t) / std_t
            logits = teacher.compute_logits(flat).float().view(*views.shape[:2], -1)
        return logits[:, 0] if views.shape[1] == 1 else combine_view_logits(logits)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(fused multi-view logits, y) + lambda * D(student, teacher) (main.py:416-418)."""
        views = self.views(images, training=True)
        if views.shape[1] == 1:
            logits = self.fused_logits(views[:, 0]).float()
        else:
            logits = compute_multiview_logits(self.fused_logits, views).float()
        self.batch_logits = logits
        losses = {"cross_entropy": F.cross_entropy(logits, labels)}
        if self.teacher is not None:
            node = self.node.DISTILL
            teacher = self.teacher_logits(views)
            loss = compute_distillation_loss(node.LOSS, logits, teacher, node.TEMPERATURE)
            losses["distillation"] = node.WEIGHT * loss
        elif self.distiller is not None:
            losses["distillation"] = self.distiller.compute_loss(logits, indices)
        return losses

    # ----- images at the stored size ------------------------------------------------------------
    def stored_images(self, data: ImageSet, in_memory: bool) -> np.ndarray | ImageRows:
        """`data`'s images at INPUT.STORE_SIZE (the store of the run may hold them at the input
        size): the same rows re-viewed, or the rows of a store at that size (decoded once per
        sweep, like the run's own)."""
        images = data.images
        if images.shape[1] == self.stored_size:
            return images
        if isinstance(images, ImageRows) and images.data.row_shape[0] == self.stored_size:
            return images.stored()
        items = data.store.items if data.store is not None else data.items
        key = tuple(item.path for item in items)
        if key not in self.native_stores:
            self.native_stores[key] = ImageStore(
                items, self.input_size, self.cfg.CACHE_DIR or None, self.stored_size
            )
        loaded = self.native_stores[key].load(data.items, in_memory=in_memory, stored=True)
        return loaded.images

    def prepare(self, train: ImageSet) -> None:
        self.cached_level_text()
        if self.distiller is not None and self.teacher is None:
            self.distiller.prepare(train, self.cfg.CACHE_DIR)
        if self.distiller is not None:
            self.report["distillation"] = {
                **self.distiller.describe(),
                "views": self.node.DISTILL_VIEWS,
            }

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        train = replace(train, images=self.stored_images(train, in_memory=True))
        result = super().fit(train, val, evaluate_fn)
        self.report["fusion_weights"] = self.network["fusion"].describe(list(self.node.LEVELS))
        if "scale" in self.network:
            self.report["logit_scale"] = round(float(self.scale().detach()), 4)
        self.report["stored_size"] = self.stored_size
        return result

    def predict_probabilities(self, data: ImageSet) -> np.ndarray:
        """Every evaluation (validation, test, targets) sees the stored-size images."""
        stored = replace(data, images=self.stored_images(data, in_memory=False))
        return super().predict_probabilities(stored)
