"""SAVLT: structure-aware vision-language tuning (multi-center cervical OCT).

LoRA on the vision encoder (the LORA node; the recipe sets q, k, v, out in all blocks, r=8,
alpha=4, dropout 0.25), text encoder frozen unless LORA.ENCODER is "both" (own rank LORA.TEXT_RANK),
visual projection trainable. The image feature f is the structure-aware attention pooling of the
patch tokens inside the region of interest (fewclip.pooling), or the CLS token. Loss: the dual
alignment of fewclip.alignment against class-description features T and prototypes P; inference
uses the same mixture of logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip import distributed
from fewclip.alignment import (
    ClassPrototypes,
    compute_dual_alignment_loss,
    compute_dual_alignment_mixture,
)
from fewclip.data import Item
from fewclip.images import augment_batch
from fewclip.lora import apply_lora
from fewclip.pooling import ROI_RULES, StructurePooling, compute_rule_region, load_region_masks
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.tokens import encode_image_tokens, patch_grid
from fewclip.trainer import ImageSet, TrainerBase

LOGGER = logging.getLogger(__name__)
POOLINGS = ("attention", "cls")


@TRAINERS.register()
class SAVLT(TrainerBase):
    """Trainable: LoRA matrices, the visual projection (TRAIN_PROJECTION), the class prototypes
    and, with attention pooling, the pooling queries and attention."""

    trainable_patterns = (
        r"\.lora_[AB]\.",
        r"^clip\.visual\.proj$",
        r"^prototypes\.",
        r"^pooling\.",
    )

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "description"  # prompt level of the class text features T
        node.PROTOTYPE_WEIGHT = 0.5  # a: weight of the prototype term (loss and logits)
        node.LOGIT_SCALE = 100.0  # s: frozen logit scale of both terms
        node.TRAIN_PROJECTION = True  # the visual projection trains with the LoRA matrices
        node.POOLING = "attention"  # "attention" (structure-aware, over the ROI) or "cls"
        node.POOL_QUERIES = 4  # learned queries of the attention pooling
        node.POOL_HEADS = 4  # attention heads of the pooling (must divide the vision width)
        node.USE_MASKS = True  # ROI from the dataset's per-image masks where given
        node.ROI_RULE = "below_surface"  # ROI of images without a mask: below_surface or all
        node.SURFACE_THRESHOLD = 0.5  # tissue surface: first row this bright (0..1 per image)
        node.SURFACE_DEPTH = 0  # patch rows kept below the surface; 0 = down to the bottom
        return add_sampler_keys(node)

    def build(self) -> None:
        node = self.node
        if node.POOLING not in POOLINGS:
            raise ValueError(f"TRAINER.SAVLT.POOLING {node.POOLING!r}: choose {POOLINGS}")
        if node.ROI_RULE not in ROI_RULES:
            raise ValueError(f"TRAINER.SAVLT.ROI_RULE {node.ROI_RULE!r}: choose {ROI_RULES}")
        if not 0.0 <= node.PROTOTYPE_WEIGHT <= 1.0:
            raise ValueError(
                f"TRAINER.SAVLT.PROTOTYPE_WEIGHT must be in [0, 1], got {node.PROTOTYPE_WEIGHT}"
            )
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        visual = self.clip.visual
        if visual.proj is None:
            raise ValueError("SAVLT needs a vision tower with a projection (visual.proj)")
        visual.proj.requires_grad_(node.TRAIN_PROJECTION)
        self.grid = patch_grid(self.clip)
        generator = torch.Generator().manual_seed(self.cfg.SEED)
        self.network["prototypes"] = ClassPrototypes(
            len(self.class_names), visual.proj.shape[1], generator
        )
        if node.POOLING == "attention":
            self.network["pooling"] = StructurePooling(
                visual.proj.shape[0], node.POOL_QUERIES, node.POOL_HEADS, generator
            )
        self.train_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mask_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- features ---------------------------------------------------------------------------
    def masks_for(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-image ROI masks on the patch grid (N, P) and has_mask (N,), or None if no masks."""
        if self.node.POOLING != "attention" or not self.node.USE_MASKS:
            return None
        key = tuple(item.mask for item in items)
        if not any(key):
            return None
        if key not in self.mask_cache:
            masks, has_mask = load_region_masks(items, self.bundle.image_size, self.grid)
            self.mask_cache[key] = (masks.to(self.device), has_mask.to(self.device))
        return self.mask_cache[key]

    def region(
        self, images: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """(B, P) bool ROI: the image's mask where it has one, else the ROI rule."""
        node = self.node
        rule = compute_rule_region(
            images,
            node.ROI_RULE,
            self.bundle.mean,
            self.bundle.std,
            self.grid,
            node.SURFACE_THRESHOLD,
            node.SURFACE_DEPTH,
        )
        if masks is None:
            return rule
        mask, has_mask = masks
        return torch.where(has_mask.unsqueeze(1), mask, rule)

    def compute_image_features(
        self, images: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, D) unit-norm image features f (ROI attention pooling or CLS)."""
        if self.node.POOLING == "cls":
            return F.normalize(self.clip.encode_image(images), dim=-1)
        _, tokens = encode_image_tokens(self.clip, images)
        pooled, _ = self.network["pooling"](tokens, self.region(images, masks))
        return F.normalize(pooled @ self.clip.visual.proj.to(pooled.dtype), dim=-1)

    # ----- training ---------------------------------------------------------------------------
    def prepare(self, train: ImageSet) -> None:
        self.train_masks = self.masks_for(train.items)
        self.batch_masks = None

    def augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """The base crop and flip, with each image's ROI mask warped by the same transform:
        the mask rides as a fourth channel at full resolution, then returns to the patch grid
        (a patch is in the ROI when most of it is)."""
        if self.train_masks is None:
            return super().augment(images, indices)
        selected = torch.as_tensor(indices, device=self.device)
        mask, has_mask = self.train_masks[0][selected], self.train_masks[1][selected]
        rows, columns = self.grid
        grid_mask = mask.view(len(indices), 1, rows, columns).to(images.dtype)
        full = F.interpolate(grid_mask, size=images.shape[-2:], mode="nearest")
        warped = augment_batch(
            torch.cat([images, full], dim=1), self.generator, self.cfg.INPUT.CROP_SCALE
        )
        patch_mask = F.adaptive_avg_pool2d(warped[:, 3:], (rows, columns)) > 0.5
        self.batch_masks = (patch_mask.flatten(1), has_mask)
        return warped[:, :3]

    def class_text(self) -> torch.Tensor:
        """(C, D) class-description features T; cached when the text tower does not train."""
        if self.text_trains:
            return self.text_features(self.node.PROMPT_LEVEL)
        return self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """SAVLT's dual alignment loss (1 - a) * CE(s f T^T, y) + a * CE(s f P^T, y), see
        `fewclip.alignment.compute_dual_alignment_loss`; f from the ROI pooling."""
        masks = None
        if self.batch_masks is not None:  # warped with the crop; this process's part
            masks = tuple(distributed.shard_batch(*self.batch_masks))
        elif self.train_masks is not None:  # no augmentation: the masks as loaded
            selected = torch.as_tensor(indices, device=self.device)
            masks = (self.train_masks[0][selected], self.train_masks[1][selected])
        node = self.node
        features, text = self.compute_image_features(images, masks), self.class_text()
        prototypes = self.network["prototypes"]()
        with torch.no_grad():  # the loop gives p(true class) to samplers that learn from it
            self.batch_logits = compute_dual_alignment_mixture(
                features, text, prototypes, node.LOGIT_SCALE, node.PROTOTYPE_WEIGHT
            )
        loss = compute_dual_alignment_loss(
            features, text, prototypes, labels, node.LOGIT_SCALE, node.PROTOTYPE_WEIGHT
        )
        return {"dual_alignment": loss}

    # ----- evaluation -------------------------------------------------------------------------
    def on_eval_start(self) -> None:
        self.eval_text = self.class_text()

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        """Dual-alignment logits; each image's ROI mask comes from its item when it has one."""
        return compute_dual_alignment_mixture(
            self.compute_image_features(images, self.masks_for(list(items))),
            self.eval_text,
            self.network["prototypes"](),
            self.node.LOGIT_SCALE,
            self.node.PROTOTYPE_WEIGHT,
        )
