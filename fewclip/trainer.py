"""The trainer base: one training loop for every method; methods say only what they add.

A trainer subclass registers itself, may declare its own config node, builds its modules in
`build()`, returns a dict of named losses from `compute_losses` and class logits from
`compute_logits`. The loop (here) owns the step; the hooks beside it (fewclip/hooks.py) own the
learning rate, validation and selection, the resumable training state, sampler feedback, logging
and the torchrun glue.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from fewclip import distributed, hooks
from fewclip.augment import augment_batch
from fewclip.backbones import ClipBundle
from fewclip.data import Item
from fewclip.features import (
    apply_performance_options,
    autocast_context,
    cached_text_features,
    compute_text_features,
    encode_image_array,
    load_image_features,
    resolve_precision,
)
from fewclip.images import (
    hold_training_images,
    iterate_image_batches,
    take_rows,
    to_model_input,
)
from fewclip.multiview import resize_to_input
from fewclip.prompts import warn_truncated
from fewclip.registry import SAMPLERS
from fewclip.training_state import BatchStream

LOGGER = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The loss became NaN or inf; `step` says when."""

    def __init__(self, step: int, losses: dict[str, float]) -> None:
        super().__init__(f"loss is not finite at step {step}: {losses}")
        self.step = step


@dataclass
class ImageSet:
    """Decoded images of one split: uint8 (N, H, W, 3), labels (N,), centers (N,)."""

    images: np.ndarray
    labels: np.ndarray
    centers: list[str]
    items: list[Item] = field(default_factory=list)  # the dataset items (masks, groups, paths)
    key: str = ""  # cache key of the decoded images ("" = not cached)
    rows: np.ndarray | None = None  # rows of `store` holding these images (None = not cached)
    store: Any = None  # the fewclip.images.ImageStore they come from (frozen-feature cache)

    def __len__(self) -> int:
        return len(self.labels)


def build_param_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, decay_all: bool = False
) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms, scales, prototypes' temperature do not,
    unless `decay_all` (OPTIM.DECAY_ALL: one group, as an optimiser over `model.parameters()`)."""
    decay, no_decay, seen = [], [], set()
    for name, param in named:
        if id(param) in seen:  # a parameter shared by two modules goes in once
            continue
        seen.add(id(param))
        skip = param.ndim < 2 or "logit_scale" in name or name.endswith(".bias") or "norm" in name
        (no_decay if skip and not decay_all else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class TrainerBase(abc.ABC):
    """Shared state and loop. Subclasses override `build`, `compute_losses`, `compute_logits`."""

    trains = True  # False for methods with nothing to train (zero-shot)
    frozen_image_encoder = False  # True when image features can be cached across runs
    # True when compute_losses / compute_logits take images at INPUT.STORE_SIZE (multi-view
    # windows); otherwise the loop and evaluation hand them images at the model input size
    takes_stored_images = False
    # Regexes over `self.network` parameter names: the only parameters this method may train
    # (the registry-wide tests hold every trainer to its declaration).
    trainable_patterns: tuple[str, ...] = ()
    # (B, C) class logits of the current training batch, set by `compute_losses` when the method
    # can: the loop turns them into p(true class) for samplers that learn from them (difficulty)
    batch_logits: torch.Tensor | None = None
    # How the method leans on the text tower's class prompts in the joint space: "predicts"
    # (its predictions are prompt similarities from the start: refuses a model whose towers are
    # not aligned), "starts" (starts from them and trains: warns), "none" (image features only)
    text_anchor = "starts"
    needs_patch_tokens = False  # True: token-level image features (a ViT family)

    @classmethod
    def config_key(cls) -> str:
        return cls.__name__.upper()

    @classmethod
    def config_node(cls) -> CfgNode | None:
        return None

    def __init__(
        self, cfg: CfgNode, bundle: ClipBundle, dataset: Any, device: torch.device
    ) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.device = device
        self.class_names: list[str] = list(dataset.class_names)
        self.prompts = dataset.prompts
        self.node = cfg.TRAINER.get(self.config_key())
        torch.manual_seed(cfg.SEED)
        self.generator = torch.Generator().manual_seed(cfg.SEED)
        self.network = nn.ModuleDict({"clip": bundle.model})
        for param in self.network.parameters():
            param.requires_grad_(False)
        self.report: dict[str, Any] = {}
        self.run_dir = None  # set by the run: where the training state and TensorBoard log go
        self.checked_levels: set[str] = set()  # prompt levels checked for truncation
        self.check_alignment()
        self.build()
        self.network.to(device)
        if "clip" in self.network:  # methods may replace CLIP by their own encoder
            apply_performance_options(self.clip, cfg.PERF)

    def check_alignment(self) -> None:
        """Refuse (or warn about) text-prompt methods on towers that share no embedding space."""
        if self.bundle.aligned or self.text_anchor == "none":
            return
        name = type(self).__name__
        problem = (
            f"{name} classifies by image-text similarity, but the towers of"
            f" {self.bundle.identity} are not aligned (fewclip_model.json: aligned false)"
        )
        if self.text_anchor == "predicts":
            raise ValueError(
                f"{problem}: its predictions would be chance; use LinearProbe, ViTTeacher or a"
                " trainer that learns the alignment"
            )
        LOGGER.warning("%s: it starts at chance and must learn the alignment", problem)

    # ----- what a method says ---------------------------------------------------------------
    def build(self) -> None:
        """Create modules (add to self.network) and mark what trains."""

    def prepare(self, train: ImageSet) -> None:
        """Once before training (and before evaluation of methods that do not train)."""

    def compute_losses(
        self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray
    ) -> dict:
        """Named scalar losses for one batch of normalised images (B, 3, H, W); summed to step."""
        raise TypeError(
            f"{type(self).__name__} sets trains=True but does not define compute_losses"
        )

    @abc.abstractmethod
    def compute_logits(self, images: torch.Tensor, items: Sequence[Item] = ()) -> torch.Tensor:
        """(B, C) class logits for normalised images, used at evaluation. `items` are the
        batch's dataset items in the same order (paths, masks, groups), or () when unknown."""

    def augment(self, images: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """Training augmentation of a batch (B, 3, H, W); methods with per-image maps (ROI
        masks) override it to move the maps with the same crop."""
        return augment_batch(
            images,
            self.generator,
            self.cfg.INPUT.CROP_SCALE,
            self.bundle.image_size,  # a crop of a larger stored image, sampled at the input size
            self.cfg.INPUT.CROP_INTERPOLATION,
        )

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the model input size: a stored image larger than the input
        (INPUT.STORE_SIZE) is resized deterministically, unless the method takes stored-size
        images itself (`takes_stored_images`, e.g. multi-view windows)."""
        if self.takes_stored_images:
            return images
        return resize_to_input(images, self.bundle.image_size)

    def on_eval_start(self) -> None:
        """Before a round of evaluation batches (e.g. compute text features once)."""

    def compute_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) logits from cached image features; only for `frozen_image_encoder` methods."""
        raise TypeError(f"{type(self).__name__} has no frozen image encoder")

    # ----- shared helpers -------------------------------------------------------------------
    @property
    def clip(self) -> nn.Module:
        return self.network["clip"]

    def text_features(self, level: str = "label") -> torch.Tensor:
        """(C, D) unit-norm class text features for a prompt level (ensemble over templates)."""
        return compute_text_features(
            self.clip, self.bundle.tokenizer, self.prompt_texts(level), self.device
        )

    def prompt_texts(self, level: str) -> list[list[str]]:
        """The prompt file's texts per class at `level`, checked by `checked_texts`."""
        return self.checked_texts(self.prompts.texts(level), level)

    def checked_texts(self, texts: list[list[str]], level: str) -> list[list[str]]:
        """`texts` per class; once per level, a warning names each class whose texts the text
        tower truncates."""
        if level not in self.checked_levels:
            self.checked_levels.add(level)
            warn_truncated(self.bundle.tokenizer, texts, self.class_names, level)
        return texts

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.network.named_parameters() if p.requires_grad]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors only (plus persistent buffers of the method's own modules)."""
        state = {name: p.detach().cpu().clone() for name, p in self.trainable_named_parameters()}
        for name, module in self.network.items():
            if name != "clip":
                for buffer_name, buffer in module.named_buffers():
                    state[f"{name}.{buffer_name}"] = buffer.detach().cpu().clone()
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        current = dict(self.network.named_parameters())
        current.update(dict(self.network.named_buffers()))
        missing = sorted(set(self.checkpoint_state()) - set(state))
        unexpected = sorted(set(state) - set(current))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not fit {type(self).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                if current[name].shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                        f"model expects {tuple(current[name].shape)}"
                    )
                current[name].copy_(tensor)

    def frozen_text_features(self, level: str = "label", unit_norm: bool = True) -> torch.Tensor:
        """`text_features` for a text tower this method never changes: computed once per
        backbone and prompt texts, cached in memory and under CACHE_DIR (no gradient).
        `unit_norm` False: the raw mean text embedding per class (`compute_text_features`)."""
        return cached_text_features(
            self.clip,
            self.bundle.tokenizer,
            self.prompt_texts(level),
            self.device,
            self.bundle.identity,
            self.cfg.CACHE_DIR or None,
            unit_norm,
        )

    def input_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        return to_model_input(
            batch, self.bundle.mean, self.bundle.std, self.device, self.cfg.PERF.CHANNELS_LAST
        )

    # ----- the loop ---------------------------------------------------------------------------
    def num_iterations(self) -> int:
        optim = self.cfg.OPTIM
        return optim.MAX_ITERS or optim.ITERS_PER_SHOT * max(1, self.cfg.DATASET.NUM_SHOTS)

    def build_optimizer(self, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (OPTIM.LR, OPTIM.WEIGHT_DECAY); a method whose
        source uses another optimiser (CoOp's SGD) overrides this."""
        optim = self.cfg.OPTIM
        groups = build_param_groups(named, optim.WEIGHT_DECAY, optim.DECAY_ALL)
        return torch.optim.AdamW(groups, lr=optim.LR)

    def num_warmup_iterations(self, total: int) -> int:
        """Warm-up steps of the schedule: OPTIM.WARMUP_ITERS, else OPTIM.WARMUP_FRACTION x total
        (epoch-based methods override it with one epoch's steps)."""
        optim = self.cfg.OPTIM
        return optim.WARMUP_ITERS or round(optim.WARMUP_FRACTION * total)

    def num_cosine_iterations(self, total: int, warmup: int) -> int:
        """The cosine's length after the warm-up: OPTIM.COSINE_ITERS, else every remaining step
        (a method whose source sets its own T_max overrides this)."""
        return self.cfg.OPTIM.COSINE_ITERS or max(1, total - warmup)

    def build_sampler(self, train: ImageSet):
        name = self.node.get("SAMPLER", "uniform") if self.node is not None else "uniform"
        return SAMPLERS.get(name)(train.labels, self.generator, self.node)

    def fit(self, train: ImageSet, val: ImageSet | None, evaluate_fn=None) -> dict[str, Any]:
        """Train for `num_iterations()` steps; validation only for reporting or selection."""
        self.prepare(train)
        if not self.trains:
            return {"iterations": 0}
        named = self.trainable_named_parameters()
        if not named:
            raise RuntimeError(f"{type(self).__name__} trains but has no trainable parameters")
        optim = self.cfg.OPTIM
        batch_size = min(optim.BATCH_SIZE, len(train))
        distributed.check_batch_size(batch_size)
        ctx = hooks.FitContext(
            trainer=self,
            train=train,
            val=val,
            evaluate_fn=evaluate_fn,
            optimizer=self.build_optimizer(named),
            batches=BatchStream(self.build_sampler(train), batch_size),
            params=[p for _, p in named],
            total=self.num_iterations(),
            epoch_steps=math.ceil(len(train) / batch_size),
        )
        loop_hooks = hooks.build_hooks(self)
        # decoded once, held for the whole fit (on the GPU when it fits): no per-step reads
        pixels = hold_training_images(train.images, self.device, self.cfg.PERF.DEVICE_IMAGES_MB)
        for hook in loop_hooks:
            hook.on_fit_start(ctx)
        self.network.train()
        for step in range(ctx.first_step, ctx.total):
            ctx.step = step
            for hook in loop_hooks:
                hook.before_step(ctx)
            ctx.indices = next(ctx.batches)
            ctx.images = self.input_tensor(
                pixels[torch.as_tensor(ctx.indices, device=pixels.device)]
            )
            if self.cfg.INPUT.AUGMENT == "crop_flip":
                ctx.images = self.augment(ctx.images, ctx.indices)
            ctx.images = self.model_input(ctx.images)
            ctx.labels = torch.as_tensor(train.labels[ctx.indices], device=self.device)
            for hook in loop_hooks:
                hook.before_forward(ctx)
            self.batch_logits = None
            with autocast_context(self.device, self.cfg.PRECISION):
                ctx.losses = self.compute_losses(ctx.images, ctx.labels, ctx.indices)
            ctx.loss = ctx.global_loss = sum(ctx.losses.values())
            for hook in loop_hooks:
                hook.after_forward(ctx)
            if not torch.isfinite(ctx.global_loss):
                losses = {k: float(v.detach()) for k, v in ctx.losses.items()}
                raise DivergedError(ctx.step, losses)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.loss.backward()
            for hook in loop_hooks:
                hook.after_backward(ctx)
            if optim.GRAD_CLIP > 0:
                torch.nn.utils.clip_grad_norm_(ctx.params, optim.GRAD_CLIP)
            ctx.optimizer.step()
            for hook in loop_hooks:
                hook.after_step(ctx)
            if ctx.stop:
                break
        self.network.eval()
        report = {"iterations": ctx.step + 1, "final_loss": float(ctx.global_loss)}
        for hook in loop_hooks:
            hook.on_fit_end(ctx, report)
        return report

    @torch.inference_mode()
    def predict_logits(self, images: Any, items: Sequence[Item] = ()) -> torch.Tensor:
        """(N, C) logits for uint8 images (N, H, W, 3) in eval mode (the previous mode is
        restored); each batch's `items` (if given, one per image) reach `compute_logits`."""
        was_training = self.network.training
        self.network.eval()
        self.on_eval_start()
        outputs, start, size = [], 0, self.cfg.EVAL.BATCH_SIZE
        for uint8_batch in iterate_image_batches(images, size, self.device):
            batch_items = items[start : start + len(uint8_batch)] if len(items) else ()
            start += len(uint8_batch)
            with autocast_context(self.device, self.cfg.PRECISION):
                batch = self.model_input(self.input_tensor(uint8_batch))
                logits = self.compute_logits(batch, batch_items)
            outputs.append(logits.float().cpu())
        self.network.train(was_training)
        return torch.cat(outputs) if outputs else torch.zeros(0, len(self.class_names))

    def image_features(self, data: ImageSet) -> torch.Tensor:
        """(N, D) unit-norm features of the frozen image encoder, each image encoded once per
        sweep (a per-image store under CACHE_DIR, keyed by backbone, precision and device)."""
        encoder_key = "|".join(
            [
                self.bundle.identity,
                resolve_precision(self.device, self.cfg.PRECISION),
                self.device.type,
                f"channels_last={self.cfg.PERF.CHANNELS_LAST}",
                f"compile={self.cfg.PERF.COMPILE}",
                "clip-image-unit-norm",
            ]
        )
        return load_image_features(
            data,
            lambda images: F.normalize(
                encode_image_array(
                    self.clip.encode_image,
                    images,
                    self.bundle.mean,
                    self.bundle.std,
                    self.device,
                    self.cfg.EVAL.BATCH_SIZE,
                    self.cfg.PRECISION,
                    self.cfg.PERF.CHANNELS_LAST,
                ),
                dim=-1,
            ),
            encoder_key,
            self.cfg.EVAL.BATCH_SIZE,
            self.cfg.CACHE_DIR or None,
        )

    def predict_probabilities(self, data: ImageSet) -> np.ndarray:
        """(N, C) class probabilities; frozen-encoder methods read cached features."""
        if self.frozen_image_encoder:
            with torch.inference_mode():
                self.on_eval_start()
                logits = self.compute_logits_from_features(
                    self.image_features(data).to(self.device)
                )
            return torch.softmax(logits.float().cpu(), dim=-1).numpy()

        # torchrun: each process predicts its contiguous rows, gathered back in order
        def predict(rows: np.ndarray) -> np.ndarray:
            items = [data.items[i] for i in rows] if data.items else ()
            logits = self.predict_logits(take_rows(data.images, rows), items)
            return torch.softmax(logits, dim=-1).numpy()

        return distributed.gather_rows(predict, np.arange(len(data)))
