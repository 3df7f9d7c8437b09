"""Methods that train on frozen image features in a loop of their own (LP++, CLAP).

The shared loop (fewclip/trainer.py) draws batches of images and its learning-rate hook sets one
rate for every parameter group each step. LP++ takes full-batch steps with a different step size
per block of parameters, and CLAP draws its batches from a pool of augmented views larger than the
training set; both run a few hundred cheap steps on features, so they loop here instead:

- `FeatureViews` (a mixin before TrainerBase, also used by Tip-Adapter for its keys): augmented
  views of the few training images through the frozen encoder, and a pool of them as samples.
- `FeatureValidation`: validation on the cached validation features every EVAL.VAL_EVERY steps
  and at the last, and EVAL.SELECT best_val's pick, as the loop's ValidationHook does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewclip.cache_model import score_predictions
from fewclip.features import autocast_context
from fewclip.images import take_rows


class FeatureViews:
    """Augmented views of the training images for a `frozen_image_encoder` trainer. The shots are
    few, so their views are encoded per run; the per-image cache (`image_features`) holds only the
    deterministic view, which val and test use."""

    def encode_augmented_views(self, train: Any, views: int) -> torch.Tensor:
        """(V, N, D) raw frozen-encoder features of `views` augmented views of every training
        image (`augment`: INPUT.CROP_SCALE, CROP_INTERPOLATION, flip), without gradient, in
        batches of EVAL.BATCH_SIZE."""
        result, size = [], self.cfg.EVAL.BATCH_SIZE
        for _ in range(views):
            chunks = []
            for start in range(0, len(train), size):
                rows = np.arange(start, min(start + size, len(train)))
                with torch.no_grad(), autocast_context(self.device, self.cfg.PRECISION):
                    images = self.augment(self.input_tensor(take_rows(train.images, rows)), rows)
                    chunks.append(self.clip.encode_image(self.model_input(images)).float())
            result.append(torch.cat(chunks))
        return torch.stack(result)

    def training_feature_pool(self, train: Any, views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm training features (V N, D) and labels (V N,): `views` augmented views of
        every image as separate samples, view by view; with `views` 0 or INPUT.AUGMENT none,
        the cached deterministic feature of each image (N, D)."""
        labels = torch.as_tensor(train.labels, device=self.device).long()
        if views > 0 and self.cfg.INPUT.AUGMENT == "crop_flip":
            features = self.encode_augmented_views(train, views).to(self.device)
            return F.normalize(features, dim=-1).flatten(0, 1), labels.repeat(views)
        return self.image_features(train).to(self.device), labels


class FeatureValidation:
    """Validation of a trainer on its cached validation features (never the test set).

    `after_step` scores the validation logits every EVAL.VAL_EVERY steps and at the last step;
    with EVAL.SELECT best_val, `finish` loads the trainable state of the best score (`keep_ties`:
    a later equal score replaces it, as LP++'s `acc_val >= best_acc`; otherwise only a better one,
    as the loop's ValidationHook).
    """

    def __init__(self, trainer: Any, val: Any, metric: str, keep_ties: bool) -> None:
        self.trainer, self.metric, self.keep_ties = trainer, metric, keep_ties
        self.select = trainer.cfg.EVAL.SELECT == "best_val"
        self.every = trainer.cfg.EVAL.VAL_EVERY
        self.features = self.labels = None
        if val is not None and len(val):
            self.features = trainer.image_features(val).to(trainer.device)
            self.labels = torch.as_tensor(val.labels, device=trainer.device)
        self.best: dict[str, Any] = {"score": -math.inf, "state": None, "step": None}
        self.history: list[dict[str, Any]] = []

    def after_step(
        self,
        step: int,
        total: int,
        logits_of: Callable[[torch.Tensor], torch.Tensor],
        loss: float,
    ) -> None:
        """After 0-based `step` of `total`; `logits_of(features)` gives the current logits."""
        last = step == total - 1
        if self.features is None or not (last or (self.every and (step + 1) % self.every == 0)):
            return
        with torch.no_grad():
            score = score_predictions(logits_of(self.features), self.labels, self.metric)
        self.history.append({"step": step + 1, "val_score": score, "loss": loss})
        best = self.best["score"]
        if score > best or (self.keep_ties and score == best):
            state = self.trainer.checkpoint_state()  # detached copies on the CPU
            self.best = {"score": score, "state": state, "step": step + 1}

    def finish(self, total: int) -> dict[str, Any]:
        """Load the selected state (best_val) and report the history and the selected step."""
        if self.select and self.best["state"] is not None:
            self.trainer.load_checkpoint_state(self.best["state"])
        selected = self.best["step"] if self.select and self.best["state"] is not None else total
        return {"val_history": self.history, "selected_step": selected}
