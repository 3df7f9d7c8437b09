"""CaM-VLA: class-aware morphological vision-language alignment (cervical cytology).

Follows the released code, leibabaya/CaM-VLA mgca/models/CaM_VLA/
mgca_module_semantic_vf_structured.py (docs/methods.md lists every formula's line).
Text side: one class-level morphological description per class (the first text of PROMPT_LEVEL).
Losses: N-to-1 matching CE(s * cos(v, t_c), y) against the class descriptions, plus the two
class-aware contrastive terms of fewclip.contrastive (text-to-vision and vision-to-text, each a
symmetric multi-positive InfoNCE). Test time: classification by the cross-modal similarity
s * cos(v, t_c). The text-to-vision attention maps can be written as PNG images
(`save_attention_maps`, and `save_artifacts` for the run folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip.contrastive import (
    ADAPTERS,
    ATTENTIONS,
    LOSSES,
    PatchAdapter,
    build_alignment,
    check_choice,
    compute_multi_positive_infonce,
)
from fewclip.data import Item
from fewclip.families import image_feature_dim
from fewclip.features import autocast_context
from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.tokens import (
    encode_image_tokens,
    encode_text_tokens,
    patch_grid,
    project_image_tokens,
    project_text_tokens,
    text_projection,
)
from fewclip.trainer import ImageSet, TrainerBase

TUNINGS = ("source", "lora")
TextFeatures = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@TRAINERS.register()
class CaMVLA(TrainerBase):
    """Trainable: TUNING source = the whole visual tower and the text projection (the text
    transformer stays frozen), TUNING lora = the LoRA matrices (LORA node); plus the patch
    adapter (ADAPTER conv_bn) and the cross-attention modules (ATTENTION learned; the source
    attention has no parameters)."""

    needs_patch_tokens = True
    trainable_patterns = (
        r"\.lora_[AB]\.",
        r"^clip\.visual\.",
        r"^clip\.(text\.)?text_projection(\.|$)",
        r"^clip\.text\.proj\.",  # a Hugging Face text tower's projection
        r"^adapter\.",
        r"^alignment\.",
    )

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "description"  # class text level (first text per class is used)
        node.LOGIT_SCALE = 10.0  # s of the N-to-1 matching and of the test-time logits (frozen)
        node.TEMPERATURE = 0.1  # temperature of both class-aware InfoNCE terms
        node.LOSS = "source"  # "source" (-log sum_P softmax) or "supcon_out" (-1/|P| sum_P log)
        node.ATTENTION = "source"  # "source" (parameter-free) or "learned" (LN + q/k/v/out)
        node.ADAPTER = "conv_bn"  # patch adapter before both attentions: "conv_bn" or "none"
        node.TUNING = "source"  # "source" (visual tower + text projection) or "lora" (LORA)
        node.TEXT_TO_VISION_WEIGHT = 0.5  # weight of the text-to-vision contrastive term
        node.VISION_TO_TEXT_WEIGHT = 0.5  # weight of the vision-to-text contrastive term
        node.HEADS = 4  # heads of each learned cross-attention (must divide the embedding size)
        node.ATTENTION_MAPS = 0  # save_artifacts: maps of this many test images (spread evenly)
        node.ATTENTION_IMAGES = []  # save_artifacts: maps of these test image paths instead
        return add_sampler_keys(node)

    def build(self) -> None:
        node = self.node
        for key, choices in (
            ("LOSS", LOSSES),
            ("ATTENTION", ATTENTIONS),
            ("ADAPTER", ADAPTERS),
            ("TUNING", TUNINGS),
        ):
            check_choice(node[key], choices, f"TRAINER.CAMVLA.{key}")
        if node.TEMPERATURE <= 0:
            raise ValueError(f"TRAINER.CAMVLA.TEMPERATURE must be > 0, got {node.TEMPERATURE}")
        self.grid = patch_grid(self.clip)
        dim = image_feature_dim(self.clip)
        if node.TUNING == "lora":
            apply_lora(self.clip, self.cfg.LORA)
            self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        else:  # the source trains its whole image encoder and the heads over a frozen BERT
            self.clip.visual.requires_grad_(True)
            text_projection(self.clip).requires_grad_(True)
            self.text_trains = False
        self.frozen_text: TextFeatures | None = None
        if node.ADAPTER == "conv_bn":
            self.network["adapter"] = PatchAdapter(dim, self.grid)
        self.network["alignment"] = build_alignment(node.ATTENTION, dim, node.HEADS)

    def encode_class_texts(self, project: bool = True) -> TextFeatures:
        """Class description features (C, D), word tokens (C, L, D), valid (C, L); with
        project=False before the text projection (width W)."""
        texts = [class_texts[0] for class_texts in self.prompt_texts(self.node.PROMPT_LEVEL)]
        tokens = self.bundle.tokenizer(texts).to(self.device)
        pooled, words, valid = encode_text_tokens(self.clip, tokens, project)
        length = int(valid.sum(dim=1).max()) + 1  # drop the padding no class uses
        return pooled.float(), words[:, :length], valid[:, :length]

    def prepare(self, train: ImageSet) -> None:
        if not self.text_trains:
            self.frozen_class_texts()

    def frozen_class_texts(self) -> TextFeatures:
        """A frozen text transformer's class features, encoded once (source lines 115-135):
        projected with TUNING lora, before the (trained) projection with TUNING source."""
        if self.frozen_text is None:
            with torch.no_grad():
                self.frozen_text = self.encode_class_texts(project=self.node.TUNING == "lora")
        return self.frozen_text

    def class_texts(self) -> TextFeatures:
        """Unit class text features (C, D), word tokens (C, L, D), valid (C, L); with TUNING
        source the trained text projection is applied to the cached features at each call
        (as the source applies its trained text heads to cached BERT features, lines 138-141)."""
        if self.text_trains:
            text, words, valid = self.encode_class_texts()
        else:
            text, words, valid = self.frozen_class_texts()
            if self.node.TUNING == "source":
                text = project_text_tokens(self.clip, text)
                words = project_text_tokens(self.clip, words)
        return F.normalize(text.float(), dim=-1), words, valid

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features v (B, D) and patch features (B, N, D): the patch tokens in the joint
        space, through the adapter when ADAPTER is conv_bn."""
        pooled, tokens = encode_image_tokens(self.clip, images)
        patches = project_image_tokens(self.clip, tokens)
        if "adapter" in self.network:
            patches = self.network["adapter"](patches.float())
        return pooled, patches

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CaM-VLA's losses, each returned already weighted (source lines 143-226):

        matching = CE(s * cos(v, t_c), y), the N-to-1 image-to-class-description cross-entropy;
        text_to_vision = w_tv * InfoNCE+(attended patches, class text); vision_to_text =
        w_vt * InfoNCE+(image anchor, attended words), the anchors and attention of
        `fewclip.contrastive` (ATTENTION); InfoNCE+ is `compute_multi_positive_infonce` (LOSS),
        positives = same-class pairs of the batch. The source's total is CE + (t2v + v2t) / 2.
        """
        node = self.node
        text, words, valid = self.class_texts()
        image, patches = self.encode_images(images)
        logits = node.LOGIT_SCALE * F.normalize(image.float(), dim=-1) @ text.t()
        self.batch_logits = logits  # the loop gives p(true class) to samplers that learn from it
        losses = {"matching": F.cross_entropy(logits, labels)}
        alignment = self.network["alignment"]
        class_text, class_words, class_valid = text[labels], words[labels], valid[labels]
        contrast = {"temperature": node.TEMPERATURE, "loss": node.LOSS}
        if node.TEXT_TO_VISION_WEIGHT:
            anchor, visual, _ = alignment.attend_text_to_vision(
                class_text, class_words, class_valid, patches
            )
            term = compute_multi_positive_infonce(visual, anchor, labels, **contrast)
            losses["text_to_vision"] = node.TEXT_TO_VISION_WEIGHT * term
        if node.VISION_TO_TEXT_WEIGHT:
            anchor, textual, _ = alignment.attend_vision_to_text(
                image, patches, class_words, class_valid
            )
            term = compute_multi_positive_infonce(anchor, textual, labels, **contrast)
            losses["vision_to_text"] = node.VISION_TO_TEXT_WEIGHT * term
        return losses

    def on_eval_start(self) -> None:
        with torch.no_grad():
            self.eval_text = self.class_texts()

    def compute_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm image features v."""
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        """Cross-modal similarity s * cos(v, t_c) against the class descriptions."""
        return self.node.LOGIT_SCALE * self.compute_image_features(images) @ self.eval_text[0].t()

    def compute_attention_maps(
        self, images: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-vision maps (B, rows, columns), summing to 1, for `classes` (B,) or, if None,
        the predicted classes; call after `on_eval_start`. Returns (maps, classes)."""
        text, words, valid = self.eval_text
        image, patches = self.encode_images(images)
        if classes is None:
            classes = (F.normalize(image.float(), dim=-1) @ text.t()).argmax(dim=1)
        _, _, maps = self.network["alignment"].attend_text_to_vision(
            text[classes], words[classes], valid[classes], patches
        )
        return maps.float().view(-1, *self.grid), classes

    def save_artifacts(self, run_dir: str | Path, test_set: ImageSet) -> list[Path]:
        """Attention maps of the test images named by ATTENTION_IMAGES, or of ATTENTION_MAPS
        test images spread over the set, into <run_dir>/attention_maps/."""
        indices = select_attention_images(
            [item.path for item in test_set.items],
            len(test_set),
            self.node.ATTENTION_IMAGES,
            self.node.ATTENTION_MAPS,
        )
        if not indices:
            return []
        paths = [test_set.items[i].path if test_set.items else f"test_{i}" for i in indices]
        run_dir = Path(run_dir)
        labels = [int(test_set.labels[i]) for i in indices]
        written = save_attention_maps(
            self, test_set.images[indices], paths, run_dir / "attention_maps", labels
        )
        self.report["attention_maps"] = [str(path.relative_to(run_dir)) for path in written]
        return written


def select_attention_images(
    paths: Sequence[str], size: int, listed: Sequence[str], count: int
) -> list[int]:
    """Indices of the listed image paths (absolute or a trailing part), else `count` indices
    spread evenly over `size` images. A listed path that is not in `paths` is an error."""
    if listed:
        absolute = [os.path.abspath(path) for path in paths]
        indices, missing = [], []
        for name in listed:
            found = [
                i
                for i, path in enumerate(absolute)
                if path == os.path.abspath(name) or path.endswith(os.sep + name.lstrip(os.sep))
            ]
            if found:
                indices.append(found[0])
            else:
                missing.append(name)
        if missing:
            raise ValueError(f"TRAINER.CAMVLA.ATTENTION_IMAGES not in the test set: {missing}")
        return indices
    if count <= 0 or size == 0:
        return []
    return sorted(set(np.linspace(0, size - 1, min(count, size)).round().astype(int).tolist()))


def attention_title(path: str, true: str | None, predicted: str, probability: float) -> str:
    """ "<image name> · true: hsil · predicted: lsil (p = 0.62)"; no true class when unknown."""
    parts = [Path(path).name]
    if true is not None:
        parts.append(f"true: {true}")
    parts.append(f"predicted: {predicted} (p = {probability:.2f})")
    return " · ".join(parts)


def save_attention_maps(
    trainer: CaMVLA,
    images: np.ndarray,
    paths: Sequence[str],
    out_dir: str | Path,
    labels: Sequence[int] | None = None,
) -> list[Path]:
    """Write one PNG per uint8 image (N, H, W, 3): the image and its text-to-vision map for the
    predicted class, titled with the true class (`labels`), the prediction and its probability;
    named `<index>_<image stem>_pred-<class>.png`. Returns the files written."""
    from fewclip.figures import plot_attention

    if len(images) != len(paths) or (labels is not None and len(labels) != len(paths)):
        raise ValueError(f"save_attention_maps: {len(images)} images but {len(paths)} paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = trainer.network.training
    trainer.network.eval()
    images = np.asarray(images)
    maps, classes, confidences = [], [], []
    batch_size = trainer.cfg.EVAL.BATCH_SIZE
    try:
        with torch.inference_mode(), autocast_context(trainer.device, trainer.cfg.PRECISION):
            trainer.on_eval_start()
            for start in range(0, len(images), batch_size):
                batch = trainer.input_tensor(images[start : start + batch_size])
                batch_maps, batch_classes = trainer.compute_attention_maps(batch)
                probabilities = trainer.compute_logits(batch).float().softmax(dim=-1)
                maps.extend(batch_maps.cpu().numpy())
                classes.extend(batch_classes.tolist())
                confidences.extend(probabilities.gather(1, batch_classes[:, None])[:, 0].tolist())
    finally:
        trainer.network.train(was_training)
    written = []
    names = trainer.class_names
    for index, (image, attention, label, path) in enumerate(zip(images, maps, classes, paths)):
        true = None if labels is None else names[int(labels[index])]
        title = attention_title(path, true, names[label], confidences[index])
        name = f"{index:03d}_{Path(path).stem}_pred-{names[label]}.png"
        written.append(plot_attention(image, attention, title, out_dir / name))
    return written
