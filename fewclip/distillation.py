"""Knowledge distillation from a frozen teacher into any student trainer (AMLPF-CLIP's ViT teacher).

A trainer that declares `node.DISTILL = distill_config_node()` and calls `build_distiller` gets:
the teacher's logits for every training image, computed once before training (on the
deterministic evaluation view of the images, not per step), and a loss on the student's batch
logits. The teacher is a finished run folder of any registered trainer (typically ViTTeacher) or
an `.npz` file of teacher logits or features keyed by image path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from yacs.config import CfgNode

from fewclip.backbones import build_clip
from fewclip.data import Item
from fewclip.images import load_image_array
from fewclip.registry import DATASETS, TRAINERS, load_plugins


def distill_config_node() -> CfgNode:
    """The DISTILL node a trainer attaches to accept a teacher."""
    node = CfgNode()
    node.SOURCE = ""  # teacher: a run folder (or its checkpoint.safetensors) or an .npz; "" = off
    node.LOSS = "l2_prob"  # source_frobenius (AMLPF-CLIP's code) | l2_prob (per-sample) | kl
    node.WEIGHT = 1.0  # lambda: total loss = task loss + lambda * distillation loss
    node.TEMPERATURE = 4.0  # T of the "kl" loss (the L2 losses compare plain softmax outputs)
    return node


def compute_frobenius_prob_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """AMLPF-CLIP's released distillation (models.py:185, `torch.norm(p_s - p_t, 2)`):
    || softmax(Z_s) - softmax(Z_t) ||_F over the whole (B, C) matrix.

    student_logits, teacher_logits: (B, C). For equal rows the value grows as sqrt(B).
    """
    difference = torch.softmax(student_logits.float(), -1) - torch.softmax(
        teacher_logits.float(), -1
    )
    return difference.flatten().norm()


def compute_l2_prob_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Per-sample variant (ours): (1/B) sum_i || softmax(z_s,i) - softmax(z_t,i) ||_2.

    student_logits, teacher_logits: (B, C). A per-sample mean of the Euclidean distance, so the
    value does not grow with the batch size (the released code's Frobenius norm does).
    """
    difference = torch.softmax(student_logits.float(), -1) - torch.softmax(
        teacher_logits.float(), -1
    )
    return difference.norm(dim=-1).mean()


def compute_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. 2015: T^2 (1/B) sum_i KL(softmax(z_t,i / T) || softmax(z_s,i / T)).

    student_logits, teacher_logits: (B, C); the T^2 factor keeps gradient sizes independent of T.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


DISTILL_LOSSES = ("source_frobenius", "l2_prob", "kl")


def compute_distillation_loss(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The DISTILL.LOSS `name` between (B, C) student and teacher logits."""
    if name == "source_frobenius":
        return compute_frobenius_prob_loss(student_logits, teacher_logits)
    if name == "l2_prob":
        return compute_l2_prob_loss(student_logits, teacher_logits)
    if name == "kl":
        return compute_kl_loss(student_logits, teacher_logits, temperature)
    raise ValueError(f"DISTILL.LOSS {name!r} is not one of {', '.join(DISTILL_LOSSES)}")


def match_items_to_paths(items: Sequence[Item], paths: Sequence[str], source: str) -> np.ndarray:
    """Row of `paths` for each item: exact path, else the longest path tail that is listed."""
    rows = {PurePosixPath(path).as_posix(): row for row, path in enumerate(paths)}
    found = []
    for item in items:
        parts = PurePosixPath(Path(item.path).as_posix()).parts
        tails = (PurePosixPath(*parts[start:]).as_posix() for start in range(len(parts)))
        row = next((rows[tail] for tail in tails if tail in rows), None)
        if row is None:
            raise ValueError(f"teacher file {source} has no entry for training image {item.path}")
        found.append(row)
    return np.asarray(found, dtype=np.int64)


def load_teacher_file(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(class names, image paths, (N, C) logits) from an .npz with `class_names`, `paths` and
    either `logits` (N, C) or `features` (N, D) with a linear head `weight` (C, D), `bias` (C,).
    No pickle: an object array (or any unreadable content) is a one-line ValueError."""
    try:
        return _read_teacher_arrays(path)
    except ValueError as error:
        if str(path) in str(error):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read teacher file {path}: {message}") from None
    except (OSError, EOFError, KeyError) as error:
        raise ValueError(f"cannot read teacher file {path}: {error}") from None


def _read_teacher_arrays(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if not {"class_names", "paths"} <= keys or not (
            "logits" in keys or {"features", "weight", "bias"} <= keys
        ):
            raise ValueError(
                f"teacher file {path} needs class_names, paths and logits (or features, weight,"
                f" bias); it has {sorted(keys)}"
            )
        if "logits" in keys:
            logits = torch.from_numpy(data["logits"]).float()
        else:
            features = torch.from_numpy(data["features"]).float()
            weight, bias = (torch.from_numpy(data[key]).float() for key in ("weight", "bias"))
            logits = features @ weight.t() + bias
        return [str(n) for n in data["class_names"]], [str(p) for p in data["paths"]], logits


def load_teacher_run(run_dir: Path, device: torch.device) -> Any:
    """The trainer of a finished run folder, rebuilt from its config.yaml and checkpoint."""
    results_path, checkpoint = run_dir / "results.json", run_dir / "checkpoint.safetensors"
    for required in (run_dir / "config.yaml", results_path, checkpoint):
        if not required.is_file():
            raise FileNotFoundError(f"teacher run folder {run_dir} has no {required.name}")
    if json.loads(results_path.read_text()).get("status") != "complete":
        raise ValueError(f"teacher run {run_dir} did not complete (see its results.json)")
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    load_plugins(cfg.PLUGINS)  # a teacher of a plugin trainer (the built-ins are loaded already)
    dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
    with torch.random.fork_rng(devices=[]):  # the teacher's seeding must not move the student's
        teacher = TRAINERS.get(cfg.TRAINER.NAME)(cfg, build_clip(cfg.MODEL), dataset, device)
    teacher.load_checkpoint_state(load_file(str(checkpoint)))
    return teacher


class Distiller:
    """Teacher logits for the training set (cached once) and the distillation loss on a batch."""

    def __init__(self, node: CfgNode, class_names: list[str], device: torch.device) -> None:
        if node.LOSS not in DISTILL_LOSSES:
            raise ValueError(
                f"DISTILL.LOSS {node.LOSS!r} is not one of {', '.join(DISTILL_LOSSES)}"
            )
        self.node = node
        self.device = device
        source = Path(node.SOURCE).expanduser()
        if source.name == "checkpoint.safetensors":
            source = source.parent
        if not source.exists():
            raise FileNotFoundError(f"DISTILL.SOURCE {node.SOURCE} does not exist")
        self.source = source
        self.from_file = source.suffix == ".npz"
        if self.from_file:
            teacher_classes, self.file_paths, self.file_logits = load_teacher_file(source)
        else:
            self.teacher = load_teacher_run(source, device)
            teacher_classes = self.teacher.class_names
        if list(teacher_classes) != list(class_names):
            raise ValueError(
                f"distillation teacher {source} has classes {list(teacher_classes)}, "
                f"the dataset has {list(class_names)}"
            )
        self.teacher_logits: torch.Tensor | None = None
        self.prepared_for: tuple[str, int] | None = None

    def prepare(self, train: Any, cache_dir: str | None) -> None:
        """Teacher logits (N, C) for the training ImageSet, once; the teacher is then released."""
        if self.prepared_for == (train.key, len(train)) and train.key:
            return
        if self.from_file:
            rows = match_items_to_paths(train.items, self.file_paths, str(self.source))
            logits = self.file_logits[torch.from_numpy(rows)]
        else:
            teacher = self.teacher or load_teacher_run(self.source, self.device)
            images, size = train.images, teacher.bundle.image_size
            if images.shape[1] != size:  # decode at the teacher's own input size
                images, _ = load_image_array(train.items, size, cache_dir)
            logits = teacher.predict_logits(images)
            self.teacher = None  # its outputs are all that training needs
        self.teacher_logits = logits.float().to(self.device)
        self.prepared_for = (train.key, len(train))

    def compute_loss(self, student_logits: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        """WEIGHT x the configured loss between (B, C) student logits and the cached teacher's."""
        if self.teacher_logits is None:
            raise RuntimeError("Distiller.prepare(train) must run before compute_loss")
        teacher = self.teacher_logits[torch.as_tensor(indices, device=self.device)]
        loss = compute_distillation_loss(
            self.node.LOSS, student_logits, teacher, self.node.TEMPERATURE
        )
        return self.node.WEIGHT * loss

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.source), "loss": self.node.LOSS, "weight": self.node.WEIGHT}


def build_distiller(node: CfgNode | None, class_names: list[str], device: torch.device):
    """A Distiller for a DISTILL node, or None when SOURCE is empty (distillation off)."""
    if node is None or not node.SOURCE:
        return None
    return Distiller(node, class_names, device)
