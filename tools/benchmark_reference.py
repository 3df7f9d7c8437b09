"""The plain reference loop and bare forward tools/benchmark.py measures fewclip against.

It is what a one-off few-shot script does: a DataLoader decodes every JPEG with PIL and
torchvision transforms on every step and every evaluation, the text features are recomputed
every step, and frozen-encoder methods encode their images again in every cell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fewclip.data import Item
from fewclip.features import autocast_context, compute_text_features
from fewclip.lora import apply_lora
from fewclip.metrics import compute_metrics
from fewclip_datasets.synthetic import CENTER_STYLES, CLASS_NAMES, make_cell_image
from fewclip_trainers.linear_probe import fit_logistic_regression


def make_jpeg_dataset(root: Path, centers: int, per_class: int, size: int) -> Path:
    """`root/center_<c>/<class>/<i>.jpg`: generated cell images, JPEG quality 90."""
    for center in range(centers):
        for label, name in enumerate(CLASS_NAMES):
            folder = root / f"center_{center}" / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                path = folder / f"{index:04d}.jpg"
                if not path.exists():
                    rng = np.random.default_rng([center, label, index])
                    style = CENTER_STYLES[center % len(CENTER_STYLES)]
                    make_cell_image(rng, name, size, style).save(path, quality=90)
    return root


class FileDataset(Dataset):
    """(image tensor, label) of image files, decoded and transformed on every access."""

    def __init__(self, items: Sequence[Item], transform: Callable) -> None:
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        with Image.open(item.path) as image:
            return self.transform(image.convert("RGB")), item.label


def reference_loader(
    items: Sequence[Item], bundle: Any, batch: int, spec: dict, train: bool
) -> DataLoader:
    """torchvision's RandomResizedCrop + flip (train) or Resize + CenterCrop (test) pipeline."""
    size, bicubic = bundle.image_size, transforms.InterpolationMode.BICUBIC
    steps = (
        [transforms.RandomResizedCrop(size, (0.5, 1.0), interpolation=bicubic)]
        + [transforms.RandomHorizontalFlip()]
        if train
        else [transforms.Resize(size, interpolation=bicubic), transforms.CenterCrop(size)]
    )
    pipeline = transforms.Compose(
        [*steps, transforms.ToTensor(), transforms.Normalize(bundle.mean, bundle.std)]
    )
    return DataLoader(
        FileDataset(items, pipeline), batch, shuffle=train, num_workers=spec["workers"]
    )


def reference_train(
    model: torch.nn.Module,
    bundle: Any,
    texts: list[list[str]],
    items: Sequence[Item],
    steps: int,
    batch: int,
    spec: dict,
) -> None:
    """`steps` AdamW steps of CLIP-LoRA's loss, re-iterating the DataLoader epoch by epoch."""
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    loader = reference_loader(items, bundle, min(batch, len(items)), spec, train=True)
    step = 0
    while step < steps:
        for images, labels in loader:
            text = compute_text_features(model, bundle.tokenizer, texts, device)  # every step
            with autocast_context(device, "auto"):
                features = F.normalize(model.encode_image(images.to(device)), dim=-1)
                logits = (model.logit_scale.exp().detach() * features @ text.t()).float()
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    model.eval()


@torch.inference_mode()
def reference_features(
    model: torch.nn.Module, bundle: Any, items: Sequence[Item], batch: int, spec: dict
) -> np.ndarray:
    """(N, D) unit-norm image features, decoded from the files through a DataLoader."""
    device = next(model.parameters()).device
    outputs = []
    for images, _ in reference_loader(items, bundle, batch, spec, train=False):
        with autocast_context(device, "auto"):
            features = F.normalize(model.encode_image(images.to(device)), dim=-1)
        outputs.append(features.float().cpu().numpy())
    return np.concatenate(outputs)


@torch.inference_mode()
def reference_probabilities(
    model: torch.nn.Module,
    bundle: Any,
    texts: list[list[str]],
    items: Sequence[Item],
    batch: int,
    spec: dict,
) -> np.ndarray:
    """(N, C) softmax of CLIP's cosine logits against freshly computed text features."""
    device = next(model.parameters()).device
    text = compute_text_features(model, bundle.tokenizer, texts, device)
    features = torch.from_numpy(reference_features(model, bundle, items, batch, spec))
    logits = model.logit_scale.exp().cpu() * features @ text.cpu().t()
    return torch.softmax(logits, dim=-1).numpy()


def evaluation_pass(name: str, trainer, evaluation, bare_inputs, bundle, texts, spec) -> None:
    """One pass over the evaluation images: the bare forward on normalised in-memory tensors,
    the toolkit (decoded cache), or the reference DataLoader over the JPEG files."""
    if name == "eval_bare":
        bare_forward(trainer, bare_inputs, spec["eval_batch"])
    elif name == "eval_toolkit":
        trainer.predict_probabilities(evaluation)
    else:
        items, batch = evaluation.items, spec["eval_batch"]
        reference_probabilities(trainer.clip, bundle, texts, items, batch, spec)


@torch.inference_mode()
def bare_forward(trainer, inputs: torch.Tensor, batch: int) -> None:
    """The model alone: CLIP-LoRA's logits and softmax on normalised in-memory tensors."""
    model, device = trainer.clip, inputs.device
    text = trainer.text_features("label")
    with autocast_context(device, "auto"):
        for start in range(0, len(inputs), batch):
            features = F.normalize(model.encode_image(inputs[start : start + batch]), dim=-1)
            torch.softmax((model.logit_scale.exp() * features @ text.t()).float(), -1).cpu()


def _linear_probe(model, bundle, split, cfg, spec: dict, classes: int) -> dict[str, np.ndarray]:
    """Features of every set decoded and encoded again; C chosen on validation, as the trainer."""
    batch = cfg.EVAL.BATCH_SIZE
    train_x = reference_features(model, bundle, split.train, batch, spec)
    train_y = np.array([item.label for item in split.train])
    val_x = reference_features(model, bundle, split.val, batch, spec)
    val_y = np.array([item.label for item in split.val])
    scores = {}
    for inverse_reg in cfg.TRAINER.LINEARPROBE.C_GRID:
        weight, bias = fit_logistic_regression(train_x, train_y, classes, inverse_reg, 1000)
        predicted = (val_x @ weight.T + bias).argmax(axis=1)
        scores[inverse_reg] = np.mean([np.mean(predicted[val_y == c] == c) for c in set(val_y)])
    chosen = max(scores, key=scores.get)
    weight, bias = fit_logistic_regression(train_x, train_y, classes, chosen, 1000)
    probabilities = {}
    for name, items in [("test", split.test), *split.targets.items()]:
        logits = torch.from_numpy(reference_features(model, bundle, items, batch, spec) @ weight.T)
        probabilities[name] = torch.softmax(logits + torch.from_numpy(bias), -1).numpy()
    return probabilities


def reference_sweep(spec: dict, benchmark_config: Callable, load_cell: Callable) -> None:
    """The benchmark sweep's cells (same configs, same split files), the plain way."""
    for recipe in ("zeroshot", "linear_probe", "clip_lora"):
        for shots in spec["shots"]:
            for seed in spec["seeds"]:
                opts = ["DATASET.NUM_SHOTS", str(shots), "SEED", str(seed)]
                opts += ["DATASET.SPLIT_SEED", str(seed), "OPTIM.MAX_ITERS", str(spec["steps"])]
                cfg = benchmark_config(spec, recipe, opts)
                dataset, split, bundle, device, _ = load_cell(cfg)
                model, texts = bundle.model.to(device), dataset.prompts.texts("label")
                batch = cfg.EVAL.BATCH_SIZE
                if recipe == "linear_probe":
                    classes = len(dataset.class_names)
                    probabilities = _linear_probe(model, bundle, split, cfg, spec, classes)
                else:
                    if recipe == "clip_lora":
                        apply_lora(model, cfg.LORA)
                        model.to(device)
                        steps, train_batch = spec["steps"], cfg.OPTIM.BATCH_SIZE
                        reference_train(model, bundle, texts, split.train, steps, train_batch, spec)
                        reference_probabilities(model, bundle, texts, split.val, batch, spec)
                    probabilities = {
                        name: reference_probabilities(model, bundle, texts, items, batch, spec)
                        for name, items in [("test", split.test), *split.targets.items()]
                    }
                sets = {"test": split.test, **split.targets}
                for name, values in probabilities.items():
                    labels = np.array([item.label for item in sets[name]])
                    compute_metrics(values, labels, dataset.class_names, dataset.positive_classes)
