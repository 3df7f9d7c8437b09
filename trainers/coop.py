"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022): M learned
context vectors in place of the prompt's words, through the frozen text tower.

Released code: KaiyangZhou/CoOp trainers/coop.py (prompt learner, text encoder, logits) on
Dassl.pytorch (SGD, constant warm-up, cosine; configs/trainers/CoOp/*.yaml; epochs by shots in
COOP.md). The text tower is frozen but gradients flow through it to the context
(fewclip/prompt_learning.py); the image encoder is frozen, so evaluation reads cached features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.data import Item
from fewclip.epoch_schedule import DasslSchedule, add_epoch_keys
from fewclip.prompt_learning import CLASS_TOKEN_POSITIONS, PromptLearner, encode_prompt_embeddings
from fewclip.registry import TRAINERS
from fewclip.trainer import ImageSet, TrainerBase

CLASS_WORDS = ("class_name", "label")


def coop_config_node() -> CfgNode:
    """CoOp's keys (train.py:90-95 of the source) with the epoch schedule of its configs."""
    node = CfgNode()
    node.N_CTX = 16  # context vectors M (ignored when CTX_INIT gives the words)
    node.CTX_INIT = ""  # initialisation words, e.g. "a photo of a" ("" = N(0, 0.02))
    node.CSC = False  # class-specific context (one set of M vectors per class)
    node.CLASS_TOKEN_POSITION = "end"  # where the class words go: end, middle, front
    node.CLASS_WORDS = "class_name"  # the class words: "class_name" ('_' -> ' ') or "label"
    add_epoch_keys(node, [1, 2, 4, 8, 16], [50, 100, 100, 200, 200])
    return node


@TRAINERS.register()
class CoOp(DasslSchedule, TrainerBase):
    """Trainable: the context vectors only."""

    frozen_image_encoder = True  # training crops pass the frozen encoder; evaluation is cached
    trainable_patterns = (r"^prompt_learner\.ctx$",)

    @classmethod
    def config_node(cls) -> CfgNode:
        return coop_config_node()

    def class_words(self) -> list[str]:
        words = self.node.CLASS_WORDS
        if words not in CLASS_WORDS:
            raise ValueError(
                f"TRAINER.{self.config_key()}.CLASS_WORDS {words!r} is not one of "
                f"{', '.join(CLASS_WORDS)}"
            )
        if words == "label":
            return [entry["label"] for entry in self.prompts.classes.values()]
        return [name.replace("_", " ") for name in self.class_names]

    def build(self) -> None:
        node = self.node
        if node.CLASS_TOKEN_POSITION not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"TRAINER.{self.config_key()}.CLASS_TOKEN_POSITION {node.CLASS_TOKEN_POSITION!r}"
                f" is not one of {', '.join(CLASS_TOKEN_POSITIONS)}"
            )
        self.network["prompt_learner"] = PromptLearner(
            self.clip,
            self.bundle.tokenizer,
            self.class_words(),
            node.N_CTX,
            node.CTX_INIT,
            node.CSC,
            node.CLASS_TOKEN_POSITION,
        )

    @property
    def prompt_learner(self) -> PromptLearner:
        return self.network["prompt_learner"]

    def prepare(self, train: ImageSet) -> None:
        self.num_train = len(train)

    # ----- text and logits ----------------------------------------------------------------------
    def compute_class_text(self) -> torch.Tensor:
        """(C, D) unit-norm text features of the learned prompts (gradient to the context)."""
        learner = self.prompt_learner
        tokens = learner.tokens.to(learner.ctx.device)
        return F.normalize(encode_prompt_embeddings(self.clip, learner(), tokens).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen image encoder (coop.py:236-239)
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach()

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CE(exp(logit_scale) f T^T, y) (coop.py:195-208, :272-273)."""
        logits = self.logit_scale() * self.encode_images(images) @ self.compute_class_text().t()
        self.batch_logits = logits
        return {"cross_entropy": F.cross_entropy(logits, labels)}

    def on_eval_start(self) -> None:
        self.eval_text = self.compute_class_text()

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale() * features.float() @ self.eval_text.t()

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        return self.compute_logits_from_features(self.encode_images(images))
