"""Linear probe: logistic regression on frozen, unit-norm CLIP image features.

The inverse regularisation strength C is chosen on the validation split only (a log grid, as in
the CLIP paper's probe protocol); the test set never takes part in the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.families import image_feature_dim
from fewclip.registry import TRAINERS
from fewclip.trainer import ImageSet, TrainerBase


class LinearHead(nn.Module):
    """A fitted (C, D) weight and (C,) bias, kept as buffers: learnt by sklearn, not by autograd."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, dim))
        self.register_buffer("bias", torch.zeros(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t() + self.bias


def fit_logistic_regression(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    inverse_reg: float,
    max_iter: int,
    class_weight: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression -> (C, D) weight, (C,) bias, in the dataset's label order.

    class_weight "balanced" weighs each training image by N / (K n_class) (sklearn's rule), so an
    imbalanced training set (all images of a 1:5 task) does not fit the majority class only.
    Classes absent from `labels` get a weight of zero and a bias of -inf-like (-1e4), so they are
    never predicted rather than shifting every label index.
    """
    from sklearn.linear_model import LogisticRegression  # here: `fewclip --dry-run` skips it

    weights = None if class_weight == "none" else class_weight
    model = LogisticRegression(C=inverse_reg, max_iter=max_iter, class_weight=weights)
    model.fit(features, labels)
    weight = np.zeros((num_classes, features.shape[1]), np.float32)
    bias = np.full(num_classes, -1e4, np.float32)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # sklearn stores one row for two classes
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight[model.classes_] = coef
    bias[model.classes_] = intercept
    return weight, bias


@TRAINERS.register()
class LinearProbe(TrainerBase):
    """Frozen encoder; only the logistic-regression head is fitted."""

    text_anchor = "none"
    frozen_image_encoder = True

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.C_GRID = [0.01, 0.1, 1.0, 10.0, 100.0]  # inverse regularisation values tried on val
        node.DEFAULT_C = 1.0  # used when there is no validation data
        node.MAX_ITER = 1000  # solver iterations
        node.CLASS_WEIGHT = "none"  # "balanced": weigh classes by inverse frequency
        return node

    def build(self) -> None:
        dim = image_feature_dim(self.clip)  # from the model, on every family
        self.network["head"] = LinearHead(len(self.class_names), dim)

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        """Pick C on validation balanced accuracy, then refit on the training shots with it."""
        train_x = self.image_features(train).numpy()
        val_x = self.image_features(val).numpy() if val is not None and len(val) else None
        scores = {}
        chosen = self.node.DEFAULT_C
        num_classes, max_iter, class_weight = (
            len(self.class_names),
            self.node.MAX_ITER,
            self.node.CLASS_WEIGHT,
        )
        if val_x is not None:
            for inverse_reg in self.node.C_GRID:
                weight, bias = fit_logistic_regression(
                    train_x, train.labels, num_classes, inverse_reg, max_iter, class_weight
                )
                predicted = (val_x @ weight.T + bias).argmax(axis=1)
                per_class = [
                    np.mean(predicted[val.labels == c] == c) for c in np.unique(val.labels)
                ]
                scores[inverse_reg] = float(np.mean(per_class))
            chosen = max(scores, key=lambda c: (scores[c], -abs(np.log10(c))))
        weight, bias = fit_logistic_regression(
            train_x, train.labels, num_classes, chosen, max_iter, class_weight
        )
        head = self.network["head"]
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
        return {"iterations": 0, "chosen_C": chosen, "val_balanced_accuracy_by_C": scores}

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.network["head"](features)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        features = torch.nn.functional.normalize(self.clip.encode_image(images), dim=-1)
        return self.compute_logits_from_features(features)
