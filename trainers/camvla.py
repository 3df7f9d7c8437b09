"""CaM-VLA: class-aware morphological vision-language alignment (cervical cytology).

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
from PIL import Image
from yacs.config import CfgNode

from fewclip.contrastive import ClassAwareAlignment, compute_multi_positive_infonce
from fewclip.data import Item
from fewclip.features import autocast_context
from fewclip.lora import apply_lora
from fewclip.registry import TRAINERS
from fewclip.samplers import add_sampler_keys
from fewclip.tokens import encode_image_tokens, encode_text_tokens, patch_grid, project_image_tokens
from fewclip.trainer import ImageSet, TrainerBase


@TRAINERS.register()
class CaMVLA(TrainerBase):
    """Trainable: the LoRA matrices (LORA node) and the two cross-attention modules."""

    trainable_patterns = (r"\.lora_[AB]\.", r"^alignment\.")

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.PROMPT_LEVEL = "description"  # class text level (first text per class is used)
        node.LOGIT_SCALE = 100.0  # s of the N-to-1 matching and of the test-time logits (frozen)
        node.TEMPERATURE = 0.07  # temperature of both class-aware InfoNCE terms
        node.TEXT_TO_VISION_WEIGHT = 0.5  # weight of the text-to-vision contrastive term
        node.VISION_TO_TEXT_WEIGHT = 0.5  # weight of the vision-to-text contrastive term
        node.HEADS = 4  # heads of each cross-attention module (must divide the embedding size)
        node.ATTENTION_MAPS = 0  # save_artifacts: maps of this many test images (spread evenly)
        node.ATTENTION_IMAGES = []  # save_artifacts: maps of these test image paths instead
        return add_sampler_keys(node)

    def build(self) -> None:
        node = self.node
        if node.TEMPERATURE <= 0:
            raise ValueError(f"TRAINER.CAMVLA.TEMPERATURE must be > 0, got {node.TEMPERATURE}")
        apply_lora(self.clip, self.cfg.LORA)
        self.text_trains = self.cfg.LORA.ENCODER in ("text", "both")
        self.grid = patch_grid(self.clip)
        self.frozen_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.network["alignment"] = ClassAwareAlignment(self.clip.visual.output_dim, node.HEADS)

    def encode_class_texts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class description features (C, D) unit norm, word tokens (C, L, D), valid (C, L)."""
        texts = [class_texts[0] for class_texts in self.prompts.texts(self.node.PROMPT_LEVEL)]
        tokens = self.bundle.tokenizer(texts).to(self.device)
        pooled, words, valid = encode_text_tokens(self.clip, tokens)
        length = int(valid.sum(dim=1).max()) + 1  # drop the padding no class uses
        return F.normalize(pooled.float(), dim=-1), words[:, :length], valid[:, :length]

    def prepare(self, train: ImageSet) -> None:
        if not self.text_trains:
            with torch.no_grad():
                self.frozen_text = self.encode_class_texts()

    def class_texts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_class_texts() if self.text_trains else self.frozen_text

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features v (B, D) and patch tokens in the joint space (B, N, D)."""
        pooled, tokens = encode_image_tokens(self.clip, images)
        return pooled, project_image_tokens(self.clip, tokens)

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """CaM-VLA's losses, each returned already weighted:

        matching = CE(s * cos(v, t_c), y), the N-to-1 image-to-class-description cross-entropy
        (CLIP's image-to-text term, Radford et al. 2021, with one text per class);
        text_to_vision = w_tv * InfoNCE+(z, t_y), z the visual content gathered by the true
        class's words; vision_to_text = w_vt * InfoNCE+(u, v), u the word content gathered by
        the image; InfoNCE+ is `compute_multi_positive_infonce` (Khosla et al. 2020, Eq. 2,
        symmetric, positives = same-class pairs of the batch).
        """
        node = self.node
        text, words, valid = self.class_texts()
        image, patches = self.encode_images(images)
        logits = node.LOGIT_SCALE * F.normalize(image.float(), dim=-1) @ text.t()
        self.batch_logits = logits  # the loop gives p(true class) to samplers that learn from it
        losses = {"matching": F.cross_entropy(logits, labels)}
        alignment = self.network["alignment"]
        class_words, class_valid = words[labels], valid[labels]
        if node.TEXT_TO_VISION_WEIGHT:
            visual, _ = alignment.attend_text_to_vision(class_words, class_valid, patches)
            term = compute_multi_positive_infonce(visual, text[labels], labels, node.TEMPERATURE)
            losses["text_to_vision"] = node.TEXT_TO_VISION_WEIGHT * term
        if node.VISION_TO_TEXT_WEIGHT:
            textual, _ = alignment.attend_vision_to_text(image, class_words, class_valid)
            term = compute_multi_positive_infonce(textual, image, labels, node.TEMPERATURE)
            losses["vision_to_text"] = node.VISION_TO_TEXT_WEIGHT * term
        return losses

    def on_eval_start(self) -> None:
        frozen = self.frozen_text  # None before training or when the text tower trains
        self.eval_text = frozen if frozen is not None else self.encode_class_texts()

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
        _, maps = self.network["alignment"].attend_text_to_vision(
            words[classes], valid[classes], patches
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
        written = save_attention_maps(
            self, test_set.images[indices], paths, run_dir / "attention_maps"
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


def render_attention_overlay(image: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """uint8 image (H, W, 3) and a map (rows, columns) -> (H, 2W, 3): the image beside the map,
    rescaled to [0, 1], upsampled bilinearly, coloured (jet) and blended half over the image."""
    from matplotlib import colormaps

    height, width = image.shape[:2]
    grid = torch.as_tensor(attention, dtype=torch.float32)[None, None]
    upsampled = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    heat = upsampled[0, 0].numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (0.5 * image.astype(np.float32) + 0.5 * colour).round().astype(np.uint8)
    return np.concatenate([image, blended], axis=1)


def save_attention_maps(
    trainer: CaMVLA, images: np.ndarray, paths: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Write one PNG per uint8 image (N, H, W, 3): the image and its text-to-vision map for the
    predicted class, named `<index>_<image stem>_<class>.png`. Returns the files written."""
    if len(images) != len(paths):
        raise ValueError(f"save_attention_maps: {len(images)} images but {len(paths)} paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = trainer.network.training
    trainer.network.eval()
    images = np.asarray(images)
    maps, classes = [], []
    batch_size = trainer.cfg.EVAL.BATCH_SIZE
    try:
        with torch.inference_mode(), autocast_context(trainer.device, trainer.cfg.PRECISION):
            trainer.on_eval_start()
            for start in range(0, len(images), batch_size):
                batch = trainer.input_tensor(images[start : start + batch_size])
                batch_maps, batch_classes = trainer.compute_attention_maps(batch)
                maps.extend(batch_maps.cpu().numpy())
                classes.extend(batch_classes.tolist())
    finally:
        trainer.network.train(was_training)
    written = []
    for index, (image, attention, label, path) in enumerate(zip(images, maps, classes, paths)):
        name = f"{index:03d}_{Path(path).stem}_{trainer.class_names[label]}.png"
        Image.fromarray(render_attention_overlay(image, attention)).save(out_dir / name)
        written.append(out_dir / name)
    return written
