"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022).

A key-value cache of the few shots (fewclip/cache_model.py) beside zero-shot CLIP:
logits = 100 f W^T + alpha exp(-beta (1 - f K^T)) L. Tip-Adapter trains nothing; Tip-Adapter-F
trains the keys (AdamW, cosine). In both, alpha and beta are searched on the validation split
only; the released code (gaopengcuhk/Tip-Adapter) searches on val too but picks Tip-Adapter-F's
epoch on the test set (main.py:114-126): fewclip selects on validation (docs/methods.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.cache_model import (
    SEARCH_METRICS,
    CacheModel,
    average_view_keys,
    build_search_grid,
    one_hot_values,
    search_alpha_beta,
)
from fewclip.data import Item
from fewclip.families import image_feature_dim
from fewclip.feature_training import FeatureViews
from fewclip.registry import TRAINERS
from fewclip.trainer import ImageSet, TrainerBase


def embedding_dim(clip: nn.Module) -> int:
    """D of the joint image-text embedding space."""
    projection = getattr(clip, "text_projection", None)
    dim = projection.shape[-1] if isinstance(projection, torch.Tensor) else 0
    return dim or image_feature_dim(clip)


@TRAINERS.register()
class TipAdapter(FeatureViews, TrainerBase):
    """Training-free: the cache is built from the few shots, alpha and beta searched on val."""

    text_anchor = "predicts"
    trains = False
    frozen_image_encoder = True
    train_keys = False

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of W (the dataset's templates, as the source)
        node.LOGIT_SCALE = 100.0  # s of s f W^T (source: 100)
        node.AUGMENT_VIEWS = 10  # augmented views averaged into each key (0 = the cached feature)
        node.INIT_ALPHA = 2.0  # alpha without validation data (and while Tip-Adapter-F trains)
        node.INIT_BETA = 1.0  # beta likewise
        node.SEARCH = True  # grid-search alpha and beta on the validation split
        node.SEARCH_SCALE = [13.0, 13.0]  # largest beta, largest alpha of the grid
        node.SEARCH_STEPS = [200, 20]  # grid points of beta, of alpha
        node.SEARCH_METRIC = "accuracy"  # criterion on validation: accuracy, balanced_accuracy
        return node

    def build(self) -> None:
        node = self.node
        if node.SEARCH_METRIC not in SEARCH_METRICS:
            raise ValueError(
                f"TRAINER.{self.config_key()}.SEARCH_METRIC {node.SEARCH_METRIC!r} is not one "
                f"of {', '.join(SEARCH_METRICS)}"
            )
        if len(node.SEARCH_SCALE) != 2 or len(node.SEARCH_STEPS) != 2:
            raise ValueError(
                f"TRAINER.{self.config_key()}.SEARCH_SCALE and SEARCH_STEPS take two values "
                "each: [beta, alpha]"
            )
        self.network["cache"] = CacheModel(
            embedding_dim(self.clip),
            len(self.class_names),
            node.INIT_ALPHA,
            node.INIT_BETA,
            trainable=self.train_keys,
        )

    @property
    def cache(self) -> CacheModel:
        return self.network["cache"]

    # ----- the cache ---------------------------------------------------------------------------
    def prepare(self, train: ImageSet) -> None:
        self.num_train = len(train)
        augmented = self.cfg.INPUT.AUGMENT == "crop_flip" and self.node.AUGMENT_VIEWS > 0
        if augmented:  # utils.py:46-57: RandomResizedCrop + flip views of every shot
            keys = average_view_keys(self.encode_augmented_views(train, self.node.AUGMENT_VIEWS))
        else:  # one deterministic view: the cached frozen feature
            keys = self.image_features(train).to(self.device)
        labels = torch.as_tensor(train.labels, device=self.device)
        self.cache.fill(keys, one_hot_values(labels, len(self.class_names)))
        self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.cache.resize_to(state, "cache.")
        super().load_checkpoint_state(state)

    # ----- fit: (train the keys), then search alpha and beta on validation ------------------
    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        report = super().fit(train, val, evaluate_fn)
        report.update(self.search_on_validation(val))
        return report

    @torch.no_grad()
    def search_on_validation(self, val: ImageSet | None) -> dict:
        """alpha, beta from the grid (utils.py:99-129) scored on `val` only; the INIT values
        when there is no validation data or SEARCH is off."""
        node = self.node
        if not node.SEARCH or val is None or not len(val):
            return {"alpha": node.INIT_ALPHA, "beta": node.INIT_BETA, "searched": False}
        features = self.image_features(val).to(self.device)
        clip_logits = node.LOGIT_SCALE * features @ self.class_text.t()
        affinity = features @ self.cache.keys.detach().t()
        beta, alpha, score = search_alpha_beta(
            clip_logits,
            affinity,
            self.cache.values,
            torch.as_tensor(val.labels, device=self.device),
            build_search_grid(node.SEARCH_SCALE[0], node.SEARCH_STEPS[0]),
            build_search_grid(node.SEARCH_SCALE[1], node.SEARCH_STEPS[1]),
            node.SEARCH_METRIC,
        )
        self.cache.alpha.fill_(alpha)
        self.cache.beta.fill_(beta)
        return {"alpha": alpha, "beta": beta, "searched": True, "val_search_score": score}

    # ----- logits -------------------------------------------------------------------------------
    def on_eval_start(self) -> None:
        if getattr(self, "class_text", None) is None:  # a trainer restored from a checkpoint
            self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        clip_logits = self.node.LOGIT_SCALE * features @ self.class_text.to(features.dtype).t()
        return self.cache(features, clip_logits)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.compute_logits_from_features(
            F.normalize(self.clip.encode_image(images), dim=-1)
        )


@TRAINERS.register()
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the keys train (main.py:66-106) by CE on the Tip-Adapter logits with the
    INIT alpha and beta; AdamW (eps 1e-4), cosine per iteration, EPOCHS epochs of the shots."""

    text_anchor = "starts"  # the keys learn; the zero-shot term stays what the towers give
    trains = True
    train_keys = True
    trainable_patterns = (r"^cache\.keys$",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = TipAdapter.config_node()
        node.EPOCHS = (
            20  # passes over the shots (source train_epoch: 20); OPTIM.MAX_ITERS overrides
        )
        node.ADAM_EPS = 1e-4  # AdamW epsilon (main.py:72)
        return node

    def num_iterations(self) -> int:
        if self.cfg.OPTIM.MAX_ITERS:
            return self.cfg.OPTIM.MAX_ITERS
        batch = min(self.cfg.OPTIM.BATCH_SIZE, self.num_train)
        return self.node.EPOCHS * math.ceil(self.num_train / batch)  # drop_last False

    def build_optimizer(self, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        optim = self.cfg.OPTIM
        params = [param for _, param in named]
        return torch.optim.AdamW(
            params, lr=optim.LR, eps=self.node.ADAM_EPS, weight_decay=optim.WEIGHT_DECAY
        )

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        with torch.no_grad():  # frozen encoder on the augmented batch (main.py:87-89)
            features = F.normalize(self.clip.encode_image(images), dim=-1)
        logits = self.compute_logits_from_features(features).float()
        self.batch_logits = logits
        return {"cross_entropy": F.cross_entropy(logits, labels)}
