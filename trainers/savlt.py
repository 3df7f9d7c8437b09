"""SAVLT: structure-aware vision-language tuning (multi-center cervical OCT).

The released code is rabbit-my/SAVLT (docs/methods.md gives file:line for each item).
LoRA on the vision encoder (the LORA node; the recipe sets q, k, v, out in all blocks, r=8,
alpha=4, dropout 0.25), text encoder frozen unless LORA.ENCODER is "both" (own rank LORA.TEXT_RANK),
visual projection trainable. The image feature f is the pooling of the patch tokens inside the
region of interest (fewclip.pooling), projected by the visual projection and L2-normalised, or
the CLS feature. Loss: the dual alignment of fewclip.alignment against class-description features
T and prototypes P; inference uses the same mixture of logits.
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
from fewclip.augment import augment_batch
from fewclip.data import Item
from fewclip.families import image_feature_dim
from fewclip.lora import apply_lora
from fewclip.pooling import (
    ROI_RULES,
    ROIS,
    ChannelGroupPooling,
    StructurePooling,
    compute_roi,
    compute_rule_region,
    load_pixel_masks,
    load_region_masks,
)
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.tokens import (
    encode_image_tokens,
    image_projection,
    image_token_width,
    patch_grid,
    project_image_tokens,
)
from fewclip.trainer import ImageSet, TrainerBase

LOGGER = logging.getLogger(__name__)
POOLINGS = ("source", "projected", "cls")
TOKENS = ("pre_ln", "post_ln")


@TRAINERS.register()
class SAVLT(TrainerBase):
    """Trainable: LoRA matrices, the visual projection (TRAIN_PROJECTION), the class prototypes
    and the pooling: `source` its per-head queries and output Linear, `projected` its queries
    and multi-head attention projections, `cls` none."""

    needs_patch_tokens = True
    trainable_patterns = (
        r"\.lora_[AB]\.",
        r"^clip\.visual\.proj$",
        r"^clip\.visual\.head\.",  # a timm image tower's projection
        r"^prototypes\.weight$",
        r"^pooling\.(queries|output\.weight|output\.bias)$",
        r"^pooling\.attention\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
    )

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "description"  # prompt level of the class text features T
        node.PROTOTYPE_WEIGHT = 0.5  # a: weight of the prototype term (loss and logits)
        node.LOGIT_SCALE = 100.0  # s: frozen logit scale of both terms
        node.TRAIN_PROJECTION = True  # the visual projection trains with the LoRA matrices
        node.POOLING = "source"  # "source" (per-head queries), "projected" (MHA) or "cls"
        node.TOKENS = "pre_ln"  # pooled patch tokens: "pre_ln" (before ln_post) or "post_ln"
        node.POOL_HEADS = 4  # heads (channel groups) of the pooling; must divide the width
        node.POOL_QUERIES = 4  # learned queries of the "projected" pooling (averaged)
        node.USE_MASKS = True  # ROI from the dataset's per-image tissue masks where given
        node.ROI = "box"  # mask -> ROI: "box" (below the first full-tissue row) or "mask"
        node.BOX_MIN_ROW = 0.1  # "box": the search for that row starts at this share of height
        node.ROI_RULE = "below_surface"  # ROI of images without a mask: below_surface or all
        node.SURFACE_THRESHOLD = 0.5  # tissue surface: first row this bright (0..1 per image)
        node.SURFACE_DEPTH = 0  # patch rows kept below the surface; 0 = down to the bottom
        return add_sampler_keys(node)

    def build(self) -> None:
        node = self.node
        for key, choices in (("POOLING", POOLINGS), ("TOKENS", TOKENS), ("ROI", ROIS),
                             ("ROI_RULE", ROI_RULES)):  # fmt: skip
            if node[key] not in choices:
                raise ValueError(
                    f"TRAINER.SAVLT.{key} {node[key]!r}: choose one of {', '.join(choices)}"
                )
        if not 0.0 <= node.PROTOTYPE_WEIGHT <= 1.0:
            raise ValueError(
                f"TRAINER.SAVLT.PROTOTYPE_WEIGHT must be in [0, 1], got {node.PROTOTYPE_WEIGHT}"
            )
        if not 0.0 <= node.BOX_MIN_ROW < 1.0:
            raise ValueError(f"TRAINER.SAVLT.BOX_MIN_ROW must be in [0, 1), got {node.BOX_MIN_ROW}")
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        image_projection(self.clip).requires_grad_(node.TRAIN_PROJECTION)
        self.grid = patch_grid(self.clip)
        generator = torch.Generator().manual_seed(self.cfg.SEED)
        self.network["prototypes"] = ClassPrototypes(
            len(self.class_names), image_feature_dim(self.clip), generator
        )
        width = image_token_width(self.clip)
        if node.POOLING == "source":
            self.network["pooling"] = ChannelGroupPooling(width, node.POOL_HEADS, generator)
        elif node.POOLING == "projected":
            self.network["pooling"] = StructurePooling(
                width, node.POOL_QUERIES, node.POOL_HEADS, generator
            )
        self.train_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train_pixel_masks: torch.Tensor | None = None
        self.batch_masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mask_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- features ---------------------------------------------------------------------------
    def masks_for(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-image ROIs on the patch grid (N, P) from the masks (rule ROI) and has_mask (N,),
        or None if no item has a mask."""
        if self.node.POOLING == "cls" or not self.node.USE_MASKS:
            return None
        key = tuple(item.mask for item in items)
        if not any(key):
            return None
        if key not in self.mask_cache:
            masks, has_mask = load_region_masks(
                items, self.bundle.image_size, self.grid, self.node.ROI, self.node.BOX_MIN_ROW
            )
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
        """(B, D) unit-norm image features f: the ROI pooling of the patch tokens (TOKENS: before
        or after ln_post), then the visual projection, then L2 (rabbit-my/SAVLT
        model.py:180-232); or the CLS feature."""
        if self.node.POOLING == "cls":
            return F.normalize(self.clip.encode_image(images), dim=-1)
        _, tokens = encode_image_tokens(self.clip, images, self.node.TOKENS == "post_ln")
        pooled, _ = self.network["pooling"](tokens, self.region(images, masks))
        return F.normalize(project_image_tokens(self.clip, pooled), dim=-1)

    # ----- training ---------------------------------------------------------------------------
    def prepare(self, train: ImageSet) -> None:
        """The training images' masks: full resolution (to follow the crop) and as ROIs."""
        self.train_masks = self.train_pixel_masks = self.batch_masks = None
        if self.node.POOLING == "cls" or not self.node.USE_MASKS:
            return
        if not any(item.mask for item in train.items):
            return
        pixels, has_mask = load_pixel_masks(train.items, self.bundle.image_size)
        self.train_pixel_masks = pixels.to(self.device)
        regions = compute_roi(pixels, self.node.ROI, self.grid, self.node.BOX_MIN_ROW)
        self.train_masks = (regions.to(self.device), has_mask.to(self.device))

    def augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """The base crop and flip, with each image's tissue mask warped by the same transform:
        the mask rides as a fourth channel at full resolution (tissue where the warped value
        is above 0.5), then becomes the ROI by the rule ROI, as the released code segments the
        augmented image (rabbit-my/SAVLT model.py:74)."""
        if self.train_pixel_masks is None:
            return super().augment(images, indices)
        selected = torch.as_tensor(indices, device=self.device)
        pixels = self.train_pixel_masks[selected].unsqueeze(1).to(images.dtype)
        if pixels.shape[-2:] != images.shape[-2:]:
            pixels = F.interpolate(pixels, size=images.shape[-2:], mode="nearest")
        warped = augment_batch(
            torch.cat([images, pixels], dim=1),
            self.generator,
            self.cfg.INPUT.CROP_SCALE,
            self.bundle.image_size,
            self.cfg.INPUT.CROP_INTERPOLATION,
        )
        tissue = warped[:, 3] > 0.5
        regions = compute_roi(tissue, self.node.ROI, self.grid, self.node.BOX_MIN_ROW)
        self.batch_masks = (regions, self.train_masks[1][selected])
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
