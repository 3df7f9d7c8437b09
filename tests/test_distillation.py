"""Distillation: loss formulas, batch-size independence, teacher sources, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from fewclip.config import build_config
from fewclip.data import Item
from fewclip.distillation import (
    Distiller,
    build_distiller,
    compute_kl_loss,
    compute_l2_prob_loss,
    distill_config_node,
    match_items_to_paths,
)
from fewclip.run import execute_run, resolve_run_dir
from fewclip.trainer import ImageSet

DATA = "configs/datasets/synthetic.yaml"
CLASSES = ["normal", "lsil", "hsil", "carcinoma"]
STUDENT = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 1.0], [0.0, 0.0, 0.0]])
TEACHER = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0], [1.0, -1.0, 0.0]])


def test_l2_prob_is_the_mean_euclidean_distance_of_softmax_outputs():
    expected = np.mean(
        [
            np.sqrt(np.sum((torch.softmax(s, 0) - torch.softmax(t, 0)).numpy() ** 2))
            for s, t in zip(STUDENT, TEACHER)
        ]
    )
    assert float(compute_l2_prob_loss(STUDENT, TEACHER)) == pytest.approx(expected, rel=1e-6)
    assert float(compute_l2_prob_loss(TEACHER, TEACHER)) == 0.0


def test_kl_is_temperature_scaled_batch_mean():
    temperature = 2.0
    expected = 0.0
    for s, t in zip(STUDENT, TEACHER):
        p_teacher = torch.softmax(t / temperature, 0)
        p_student = torch.softmax(s / temperature, 0)
        expected += float((p_teacher * (p_teacher.log() - p_student.log())).sum())
    expected *= temperature**2 / len(STUDENT)
    assert float(compute_kl_loss(STUDENT, TEACHER, temperature)) == pytest.approx(expected, 1e-5)


@pytest.mark.parametrize("loss", ["l2_prob", "kl"])
def test_losses_do_not_grow_with_batch_size(loss):
    def compute(student, teacher):
        if loss == "kl":
            return float(compute_kl_loss(student, teacher, 4.0))
        return float(compute_l2_prob_loss(student, teacher))

    batch_of_4 = compute(STUDENT, TEACHER)
    batch_of_8 = compute(STUDENT.repeat(2, 1), TEACHER.repeat(2, 1))
    assert batch_of_8 == pytest.approx(batch_of_4, rel=1e-6)


def make_items(root: Path, count: int) -> list[Item]:
    return [
        Item(path=str(root / "center_a" / CLASSES[i % 4] / f"img_{i}.png"), label=i % 4,
             class_name=CLASSES[i % 4])
        for i in range(count)
    ]  # fmt: skip


def node_for(source: Path, loss: str = "l2_prob", weight: float = 1.0) -> CfgNode:
    node = distill_config_node()
    node.SOURCE, node.LOSS, node.WEIGHT = str(source), loss, weight
    return node


def test_teacher_file_rows_follow_the_training_images_by_path(tmp_path):
    items = make_items(tmp_path / "data", 4)
    logits = np.arange(16, dtype=np.float32).reshape(4, 4)
    # the file lists paths relative to the data folder and in another order
    paths = [f"center_a/{item.class_name}/{Path(item.path).name}" for item in items][::-1]
    np.savez(tmp_path / "t.npz", class_names=CLASSES, paths=paths, logits=logits[::-1])
    distiller = Distiller(node_for(tmp_path / "t.npz", weight=0.5), CLASSES, torch.device("cpu"))
    images = np.zeros((4, 8, 8, 3), np.uint8)
    distiller.prepare(ImageSet(images, np.arange(4) % 4, ["center_a"] * 4, items), None)
    torch.testing.assert_close(distiller.teacher_logits, torch.from_numpy(logits))
    student = torch.randn(2, 4)
    expected = 0.5 * compute_l2_prob_loss(student, torch.from_numpy(logits[[3, 1]]))
    torch.testing.assert_close(distiller.compute_loss(student, np.array([3, 1])), expected)


def test_teacher_features_file_with_linear_head(tmp_path):
    items = make_items(tmp_path, 2)
    features = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    bias = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    np.savez(tmp_path / "f.npz", class_names=CLASSES, paths=[i.path for i in items],
             features=features, weight=weight, bias=bias)  # fmt: skip
    distiller = build_distiller(node_for(tmp_path / "f.npz"), CLASSES, torch.device("cpu"))
    distiller.prepare(ImageSet(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ["c"] * 2,
                               items), None)  # fmt: skip
    torch.testing.assert_close(
        distiller.teacher_logits, torch.from_numpy(features @ weight.T + bias)
    )


def test_teacher_with_other_classes_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "t.npz", class_names=["benign", "malignant"], paths=["a.png"],
             logits=np.zeros((1, 2), np.float32))  # fmt: skip
    with pytest.raises(ValueError) as error:
        Distiller(node_for(tmp_path / "t.npz"), CLASSES, torch.device("cpu"))
    message = str(error.value)
    assert "['benign', 'malignant']" in message and str(CLASSES) in message
    assert "\n" not in message


def test_missing_training_image_in_teacher_file_is_named(tmp_path):
    items = make_items(tmp_path, 2)
    with pytest.raises(ValueError, match="img_1.png"):
        match_items_to_paths(items, [items[0].path], "t.npz")


def test_distillation_off_without_source():
    assert build_distiller(distill_config_node(), CLASSES, torch.device("cpu")) is None
    with pytest.raises(FileNotFoundError, match="DISTILL.SOURCE"):
        build_distiller(node_for(Path("/nonexistent/run")), CLASSES, torch.device("cpu"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shared_cache) -> tuple[Path, list[str]]:
    """A ViTTeacher run folder trained for two iterations, and the opts that made it."""
    opts = [
        "OUTPUT_DIR", str(tmp_path_factory.mktemp("teacher")),
        "CACHE_DIR", str(shared_cache),
        "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
        "DATASET.NUM_SHOTS", "2",
        "DATASET.VAL_SHOTS", "2",
        "DATASET.TARGET_CENTERS", "center_b",
        "OPTIM.MAX_ITERS", "2",
        "OPTIM.BATCH_SIZE", "8",
    ]  # fmt: skip
    cfg = build_config("configs/trainers/vit_teacher.yaml", DATA, opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    return resolve_run_dir(cfg), opts


def test_teacher_logits_are_computed_once_then_the_teacher_is_released(teacher_run):
    run_dir, _ = teacher_run
    distiller = Distiller(
        node_for(run_dir / "checkpoint.safetensors"), CLASSES, torch.device("cpu")
    )
    teacher = distiller.teacher
    calls = []
    original = teacher.predict_logits
    teacher.predict_logits = lambda images: calls.append(len(images)) or original(images)
    images = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 0])
    train = ImageSet(images, labels, ["center_a"] * 5, key="decoded-train-images")
    distiller.prepare(train, None)
    distiller.prepare(train, None)  # e.g. a second fit: nothing to recompute
    for _ in range(3):
        distiller.compute_loss(torch.randn(2, 4), np.array([0, 4]))
    assert calls == [5] and distiller.teacher is None
    torch.testing.assert_close(distiller.teacher_logits, original(images))


@pytest.mark.parametrize(
    ("trainer", "extra"),
    [
        ("amlpf", []),
        ("clip_lora", ["TRAINER.CLIPLORA.DISTILL.LOSS", "kl",
                       "TRAINER.CLIPLORA.SAMPLER", "difficulty"]),
    ],
)  # fmt: skip
def test_students_distil_from_a_vit_teacher_run(teacher_run, tmp_path, trainer, extra):
    run_dir, opts = teacher_run
    key = "AMLPF" if trainer == "amlpf" else "CLIPLORA"
    opts = [*opts, "OUTPUT_DIR", str(tmp_path), f"TRAINER.{key}.DISTILL.SOURCE", str(run_dir)]
    results = execute_run(build_config(f"configs/trainers/{trainer}.yaml", DATA, opts + extra))
    assert results["status"] == "complete", results.get("error")
    distillation = results["training"]["distillation"]
    assert distillation["source"] == str(run_dir)
    assert distillation["loss"] == ("kl" if extra else "source_frobenius")  # AMLPF: the source
