"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig, Ben Ayed, "LP++: A Surprisingly Strong Linear
Probe for Few-Shot CLIP", CVPR 2024).

A linear probe on the frozen unit-norm image features whose class weights are blended with the
class text features by learnable class-wise multipliers: logits = f W^T + b + alpha * (f T^T).
Released code: FereshteShakeri/FewShot-CLIP-Strong-Baseline methods/linear_probe_p2.py. W starts
at the class sums of the shot features, b as torch's Linear, alpha at 250 x the mean class-wise
text similarity of the shots; full-batch steps: W and b by SGD (momentum 0.9) at 4 N /
lambda_max(F^T F), alpha every 10th epoch by a gradient step of N / (4 max_c sum_i (f_i . t_c)^2)
on its gradient summed since the start (the source never resets it); 300 epochs, the epoch kept
by validation accuracy (validation data only). Every formula's source line is in docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.cache_model import SEARCH_METRICS
from fewclip.data import Item
from fewclip.families import image_feature_dim
from fewclip.feature_training import FeatureValidation, FeatureViews
from fewclip.registry import TRAINERS
from fewclip.trainer import DivergedError, ImageSet, TrainerBase


def compute_lpp_logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    text: torch.Tensor,
) -> torch.Tensor:
    """f W^T + b + alpha * (f T^T) (linear_probe_p2.py:127-129): features (N, D), weight (C, D),
    bias (C,), alpha (C,), unit-norm class text features text (C, D) -> (N, C)."""
    return features @ weight.t() + bias + alpha * (features @ text.t())


def compute_class_sums(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(C, D) sum of each class's features, the source's W init (utils.py:111-124: one-hot^T F;
    the division by the class count is commented out at :122). A class without shots gets 0."""
    return F.one_hot(labels, num_classes).to(features.dtype).t() @ features


def compute_init_alpha(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, num_classes: int
) -> float:
    """250 x the mean over classes of the class mean of f_i . t_c over class c's shots
    (linear_probe_p2.py:24-30, utils.py:96-108; the code's x shots and / shots cancel).
    Classes without shots are left out of the mean."""
    similarity = (features.double() @ text.double().t()).gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, similarity)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return 250.0 * float((sums[present] / counts[present]).mean())


def compute_weight_step(features: torch.Tensor) -> float:
    """W's and b's step size 4 N / lambda_max(F^T F) (linear_probe_p2.py:32-39), in fp64."""
    gram = features.double().t() @ features.double()
    return 4.0 * len(features) / float(torch.linalg.eigvalsh(gram)[-1])


def compute_alpha_step(features: torch.Tensor, text: torch.Tensor) -> float:
    """alpha's step size N / (4 max_c sum_i (f_i . t_c)^2) (linear_probe_p2.py:16-22), in fp64."""
    similarity = features.double() @ text.double().t()
    return len(features) / (4.0 * float(similarity.pow(2).sum(dim=0).max()))


class LPPlusPlusHead(nn.Module):
    """The trained tensors: weight W (C, D), bias b (C,), multipliers alpha (C,)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.alpha = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return compute_lpp_logits(features, self.weight, self.bias, self.alpha, text)


def run_block_descent(
    head: LPPlusPlusHead,
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    steps: tuple[float, float],
    epochs: int,
    alpha_every: int,
    momentum: float,
    after_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """LP++'s full-batch epochs (linear_probe_p2.py:116-139) on a started `head`: each epoch one
    CE step of W and b by SGD(lr = steps[0], momentum); after every `alpha_every`-th epoch
    alpha -= steps[1] * (alpha's gradient summed over all epochs so far: the source's optimiser
    holds only W and b, so alpha's gradient is never reset). `after_epoch(epoch, loss)` follows
    each epoch (validation). Returns the last loss."""
    weight_step, alpha_step = steps
    optimizer = torch.optim.SGD([head.weight, head.bias], lr=weight_step, momentum=momentum)
    head.alpha.grad = None
    loss_value = math.nan
    for epoch in range(epochs):
        loss = F.cross_entropy(head(features, text), labels)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise DivergedError(epoch, {"cross_entropy": loss_value})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (epoch + 1) % alpha_every == 0:
            with torch.no_grad():
                head.alpha -= alpha_step * head.alpha.grad
        if after_epoch is not None:
            after_epoch(epoch, loss_value)
    return loss_value


@TRAINERS.register()
class LPPlusPlus(FeatureViews, TrainerBase):
    """Frozen encoder; trains W, b and alpha of the probe on the shots' features."""

    frozen_image_encoder = True
    text_anchor = "starts"  # alpha * f T^T starts from the class text features and trains
    trainable_patterns = (r"^probe\.(weight|bias|alpha)$",)

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "label"  # prompt level of T (the dataset's templates, as the source)
        node.EPOCHS = 300  # full-batch epochs (source base.yaml:17); OPTIM.MAX_ITERS overrides
        node.ALPHA_EVERY = 10  # alpha steps after every ALPHA_EVERY-th epoch (source: 10)
        node.MOMENTUM = 0.9  # SGD momentum of W and b (source: 0.9)
        node.AUGMENT_VIEWS = 1  # augmented views per shot as training samples (0 = cached feature)
        node.SELECT_METRIC = "accuracy"  # EVAL.SELECT best_val criterion: or balanced_accuracy
        return node

    def build(self) -> None:
        node, key = self.node, f"TRAINER.{self.config_key()}"
        for name in ("EPOCHS", "ALPHA_EVERY"):
            if node[name] < 1:
                raise ValueError(f"{key}.{name} must be at least 1, not {node[name]}")
        if node.AUGMENT_VIEWS < 0:
            raise ValueError(f"{key}.AUGMENT_VIEWS must be 0 or more, not {node.AUGMENT_VIEWS}")
        if not 0.0 <= node.MOMENTUM < 1.0:
            raise ValueError(f"{key}.MOMENTUM must be in [0, 1), not {node.MOMENTUM}")
        if node.SELECT_METRIC not in SEARCH_METRICS:
            raise ValueError(
                f"{key}.SELECT_METRIC {node.SELECT_METRIC!r} is not one of "
                f"{', '.join(SEARCH_METRICS)}"
            )
        self.network["probe"] = LPPlusPlusHead(len(self.class_names), image_feature_dim(self.clip))

    @property
    def probe(self) -> LPPlusPlusHead:
        return self.network["probe"]

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict:
        """Start W, b, alpha from the shots and the text, run the epochs, keep the validation
        pick. Validation uses the cached validation features only (FeatureValidation)."""
        node, num_classes = self.node, len(self.class_names)
        features, labels = self.training_feature_pool(train, node.AUGMENT_VIEWS)
        self.class_text = text = self.frozen_text_features(node.PROMPT_LEVEL)
        steps = (compute_weight_step(features), compute_alpha_step(features, text))
        init_alpha = compute_init_alpha(features, labels, text, num_classes)
        probe = self.probe
        with torch.no_grad():
            probe.weight.copy_(compute_class_sums(features, labels, num_classes))
            bound = 1.0 / math.sqrt(features.shape[1])  # torch's Linear bias init (:96)
            probe.bias.copy_(
                torch.empty(num_classes).uniform_(-bound, bound, generator=self.generator)
            )
            probe.alpha.fill_(init_alpha)
        epochs = self.cfg.OPTIM.MAX_ITERS or node.EPOCHS
        validation = FeatureValidation(self, val, node.SELECT_METRIC, keep_ties=True)
        loss = run_block_descent(
            probe,
            features,
            labels,
            text,
            steps,
            epochs,
            node.ALPHA_EVERY,
            node.MOMENTUM,
            lambda epoch, value: validation.after_step(
                epoch, epochs, lambda f: probe(f, text), value
            ),
        )
        return {
            "iterations": epochs,
            "final_loss": loss,
            "weight_step": steps[0],
            "alpha_step": steps[1],
            "init_alpha": init_alpha,
            "num_training_features": len(features),
            **validation.finish(epochs),
        }

    # ----- logits -------------------------------------------------------------------------------
    def on_eval_start(self) -> None:
        if getattr(self, "class_text", None) is None:  # a trainer restored from a checkpoint
            self.class_text = self.frozen_text_features(self.node.PROMPT_LEVEL)

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe(features.float(), self.class_text)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.compute_logits_from_features(
            F.normalize(self.clip.encode_image(images), dim=-1)
        )
