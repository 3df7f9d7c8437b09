"""AMLPF-CLIP against the released code (Xizhang-Yao/AMLPF-CLIP): fusion, multi-view windows,
the Frobenius distillation, trainable sets, options, end-to-end runs (CLI and real data)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_command

from fewclip.backbones import build_clip
from fewclip.config import ConfigError, build_config
from fewclip.distillation import (
    compute_distillation_loss,
    compute_frobenius_prob_loss,
    compute_l2_prob_loss,
)
from fewclip.fusion import PromptFusion, compute_fused_logits, compute_level_logits
from fewclip.multiview import (
    build_views,
    combine_view_logits,
    compute_upscaled_size,
    compute_window_boxes,
    multiview_config_node,
    select_windows,
)
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run, resolve_run_dir
from fewclip_trainers.amlpf import AMLPF, LogitScale

ROOT = Path(__file__).resolve().parent.parent
RECIPE, DATA = "configs/trainers/amlpf.yaml", "configs/datasets/synthetic.yaml"
CLASSES = ["normal", "lsil", "hsil", "carcinoma"]
REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))


# ----- prompt fusion (models.py:40, 139-151) --------------------------------------------------
def test_level_logits_are_scaled_cosines_per_level():
    features = F.normalize(torch.randn(3, 5), dim=-1)
    text = F.normalize(torch.randn(2, 4, 5), dim=-1)
    logits = compute_level_logits(features, text, 10.0)
    assert logits.shape == (2, 3, 4)
    torch.testing.assert_close(logits[1], 10.0 * features @ text[1].t())


def test_fused_logits_are_the_weighted_sum_of_levels_and_raw_weights_start_at_one():
    levels = torch.arange(24.0).reshape(3, 2, 4)
    weights = torch.tensor([1.0, 2.0, -0.5])
    expected = levels[0] + 2 * levels[1] - 0.5 * levels[2]
    torch.testing.assert_close(compute_fused_logits(levels, weights), expected)
    torch.testing.assert_close(PromptFusion(3, "raw").level_weights(), torch.ones(3))
    soft = PromptFusion(3, "softmax")
    torch.testing.assert_close(soft.level_weights(), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="fusion mode"):
        PromptFusion(3, "mean")


# ----- multi-view windows (main.py:125-166) ---------------------------------------------------
def source_boxes(height: int, width: int) -> list[tuple[int, int]]:
    """The source's own ops on a (1, 2, H, W) image of row and column indices: unfold with
    kernel 224, step 48 if a side >= 1024 else 32, permute(2, 3, 0, 1, 4, 5), reshape; the
    top-left pixel of each patch is its box."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    image = torch.stack([rows, cols]).unsqueeze(0)
    step = 48 if (image.size(2) >= 1024) | (image.size(3) >= 1024) else 32
    patches = (image.unfold(2, 224, step).unfold(3, 224, step).permute(2, 3, 0, 1, 4, 5)).reshape(
        -1, 2, 224, 224
    )
    return [(int(p[0, 0, 0]), int(p[1, 0, 0])) for p in patches]


@pytest.mark.parametrize(
    ("height", "width", "step", "grid"),
    [(512, 640, 32, (10, 14)), (1200, 1600, 48, (21, 29))],  # (H-224)//step + 1 per side
)
def test_windows_are_the_source_boxes(height, width, step, grid):
    boxes = compute_window_boxes(height, width, 224, 32, 48, 1024)
    assert boxes == source_boxes(height, width)
    assert len(boxes) == grid[0] * grid[1]
    assert boxes[1] == (0, step) and boxes[grid[1]] == (step, 0)  # row-major
    assert boxes[-1] == ((grid[0] - 1) * step, (grid[1] - 1) * step)
    test = select_windows(len(boxes), 8).tolist()  # sel[i] = (n // 8) * i
    assert test == [(len(boxes) // 8) * i for i in range(8)]
    if height == 512:
        assert test == [0, 17, 34, 51, 68, 85, 102, 119]
        assert [boxes[i] for i in test[:3]] == [(0, 0), (32, 96), (64, 192)]
    else:
        assert test == [0, 76, 152, 228, 304, 380, 456, 532]
        assert [boxes[i] for i in test[:2]] == [(0, 0), (96, 864)]


def test_training_windows_are_a_random_draw_with_replacement_and_images_upscale_to_512():
    expected = torch.randint(0, 140, (8,), generator=torch.Generator().manual_seed(3))
    drawn = select_windows(140, 8, torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, expected)
    # AdaptiveResize(512) = torchvision Resize(512) of the short side when a side is < 512
    assert compute_upscaled_size(300, 400, 512) == (512, int(512 * 400 / 300))
    assert compute_upscaled_size(460, 700, 512) == (512, int(512 * 700 / 460))
    assert compute_upscaled_size(512, 512, 512) == (512, 512)
    assert compute_upscaled_size(1200, 1600, 512) == (1200, 1600)
    with pytest.raises(ValueError, match="fewer than the 8"):
        select_windows(5, 8)


def test_views_are_the_window_crops_then_the_resized_full_image():
    node = multiview_config_node()
    node.MIN_SIDE, node.WINDOWS, node.STRIDE = 8, 3, 2
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = build_views(images, node, 4, None)
    assert views.shape == (2, 4, 3, 4, 4)
    boxes = compute_window_boxes(8, 8, 4, 2, 48, 1024)  # 3 x 3 = 9 windows: 0, 3, 6
    for j, box in enumerate([boxes[0], boxes[3], boxes[6]]):
        top, left = box
        torch.testing.assert_close(views[:, j], images[:, :, top : top + 4, left : left + 4])
    full = F.interpolate(images, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(views[:, -1], full)
    logits = torch.randn(2, 4, 5)  # models.py:145: (mean of the windows + full) / 2
    expected = (logits[:, :3].mean(dim=1) + logits[:, 3]) / 2
    torch.testing.assert_close(combine_view_logits(logits), expected)


# ----- distillation (models.py:185) ---------------------------------------------------------
def test_source_distillation_is_the_frobenius_norm_of_the_probability_difference():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 3.0]])
    difference = torch.softmax(student, 1) - torch.softmax(teacher, 1)
    frobenius = math.sqrt(sum(float(v) ** 2 for v in difference.flatten()))
    value = compute_frobenius_prob_loss(student, teacher)
    assert float(value) == pytest.approx(frobenius, rel=1e-6)
    assert float(value) == pytest.approx(float(torch.norm(difference, 2)), rel=1e-6)  # source
    per_sample = float(difference.norm(dim=1).mean())
    assert float(compute_l2_prob_loss(student, teacher)) == pytest.approx(per_sample, rel=1e-6)
    repeated = compute_frobenius_prob_loss(student[:1].repeat(4, 1), teacher[:1].repeat(4, 1))
    single = compute_frobenius_prob_loss(student[:1], teacher[:1])
    assert float(repeated) == pytest.approx(2 * float(single), rel=1e-6)  # grows as sqrt(B)
    assert float(compute_distillation_loss("source_frobenius", student, teacher, 4.0)) == float(
        value
    )
    with pytest.raises(ValueError, match="source_frobenius, l2_prob, kl"):
        compute_distillation_loss("l1", student, teacher, 4.0)


# ----- the trainer ------------------------------------------------------------------------------
def build_trainer(*opts: str) -> AMLPF:
    cfg = build_config(RECIPE, DATA, list(opts))
    prompts = load_prompt_file("configs/prompts/synthetic.yaml", CLASSES)
    dataset = SimpleNamespace(class_names=CLASSES, prompts=prompts)
    return AMLPF(cfg, build_clip(cfg.MODEL), dataset, torch.device("cpu"))


def test_paper_student_trains_the_visual_encoder_fusion_and_an_unclamped_scale():
    trainer = build_trainer()
    names = {name for name, _ in trainer.trainable_named_parameters()}
    visual = {f"clip.{n}" for n, _ in trainer.clip.named_parameters() if n.startswith("visual.")}
    assert names == visual | {"fusion.weights", "scale.logit_scale"}
    scale = trainer.network["scale"]
    with torch.no_grad():
        scale.logit_scale.fill_(math.log(500.0))
    assert float(trainer.scale().detach()) == pytest.approx(500.0)  # models.py:138: no clamp
    assert float(LogitScale(math.log(500.0), 100.0)().detach()) == pytest.approx(100.0)


def test_lora_student_and_frozen_scale_are_options():
    trainer = build_trainer("TRAINER.AMLPF.STUDENT", "lora", "TRAINER.AMLPF.LOGIT_SCALE", "frozen")
    names = [name for name, _ in trainer.trainable_named_parameters()]
    others = [n for n in names if n != "fusion.weights"]
    assert "fusion.weights" in names and "scale" not in trainer.network
    assert others and all(".lora_" in n and n.startswith("clip.visual.") for n in others)
    with pytest.raises(ValueError, match="LORA.ENCODER vision"):
        build_trainer("TRAINER.AMLPF.STUDENT", "lora", "LORA.ENCODER", "both")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("TRAINER.AMLPF.MULTIVIEW.MODE", "grid", "MULTIVIEW.MODE 'grid' is not one of source"),
        ("TRAINER.AMLPF.DISTILL.LOSS", "l1", "DISTILL.LOSS 'l1' is not one of source_frob"),
        ("TRAINER.AMLPF.DISTILL_VIEWS", "all", "DISTILL_VIEWS 'all' is not one of same, cached"),
        ("TRAINER.AMLPF.STUDENT", "text", "STUDENT 'text' is not one of full, lora"),
        ("TRAINER.AMLPF.LOGIT_SCALE", "fixed", "LOGIT_SCALE 'fixed' is not one of learned"),
        ("TRAINER.AMLPF.DIFFICULTY_ESTIMATE", "mean", "DIFFICULTY_ESTIMATE 'mean' is not one"),
        ("TRAINER.AMLPF.SAMPLER", "balanced", "SAMPLER: unknown sampler 'balanced'. Registered: "),
        ("TRAINER.AMLPF.LEVELS", "[label, words]", "LEVELS .* each one of label, short"),
        ("TRAINER.AMLPF.MULTIVIEW.STRIDE", "0", "MULTIVIEW.STRIDE must be >= 1"),
    ],
)
def test_unknown_option_values_name_the_key_and_the_choices(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_trainer(key, value)


def test_store_size_below_the_model_input_fails_when_the_trainer_is_built():
    with pytest.raises(ConfigError, match="INPUT.STORE_SIZE 32 is smaller than the model input"):
        build_trainer("INPUT.STORE_SIZE", "32")  # before run.py builds the image store


def test_word_level_is_the_bare_label_and_logits_average_views():
    trainer = build_trainer("INPUT.STORE_SIZE", "128", "TRAINER.AMLPF.MULTIVIEW.MIN_SIDE", "128")
    level_text = trainer.cached_level_text()
    assert trainer.prompts.texts("word")[0] == ["normal squamous cells"]  # no template
    torch.testing.assert_close(level_text[0], trainer.text_features("word"))
    images = torch.randn(2, 3, 128, 128)
    views = build_views(images, trainer.node.MULTIVIEW, 64, None)
    assert views.shape == (2, 9, 3, 64, 64)
    per_view = trainer.fused_logits(views.flatten(0, 1)).view(2, 9, -1)
    expected = (per_view[:, :8].mean(1) + per_view[:, 8]) / 2
    torch.testing.assert_close(trainer.compute_logits(images), expected, rtol=1e-4, atol=1e-4)
    single = build_trainer("TRAINER.AMLPF.MULTIVIEW.MODE", "off")
    assert single.compute_logits(torch.randn(2, 3, 64, 64)).shape == (2, 4)


# ----- end to end -----------------------------------------------------------------------------
SMALL = [
    "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "8",
    "DATASET.VAL_SHOTS", "2",
    "DATASET.TARGET_CENTERS", "center_b",
    "OPTIM.BATCH_SIZE", "4",
    "EVAL.BATCH_SIZE", "32",
    "INPUT.STORE_SIZE", "128",
    "TRAINER.AMLPF.MULTIVIEW.MIN_SIDE", "128",
]  # fmt: skip


def test_paper_recipe_runs_through_the_cli(tmp_path, shared_cache):
    out = tmp_path / "out"
    args = [
        "--recipe", RECIPE, "--dataset-config", DATA,
        "--shots", "2", "--seeds", "1", "OPTIM.MAX_ITERS", "4",
        "OUTPUT_DIR", str(out), "CACHE_DIR", str(shared_cache), *SMALL[:10],
    ]  # fmt: skip
    results = run_command(args, out)
    assert results["status"] == "complete", results.get("error")
    training = results["training"]
    assert set(training["fusion_weights"]) == {"word", "short", "description"}
    assert training["stored_size"] == 512 and training["logit_scale"] > 0
    assert np.isfinite(training["sampler"]["class_probabilities"]).all()


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shared_cache) -> Path:
    opts = [
        "OUTPUT_DIR", str(tmp_path_factory.mktemp("teacher")), "CACHE_DIR", str(shared_cache),
        "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "2", *SMALL[:8],
    ]  # fmt: skip
    cfg = build_config("configs/trainers/vit_teacher.yaml", DATA, opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    return resolve_run_dir(cfg)


def test_teacher_sees_the_student_views_each_step(teacher_run, tmp_path, shared_cache):
    trainer = build_trainer(
        *SMALL[10:],
        "TRAINER.AMLPF.DISTILL.SOURCE",
        str(teacher_run),
        "CACHE_DIR",
        str(shared_cache),
    )
    teacher = trainer.teacher
    images, labels = torch.randn(3, 3, 128, 128), torch.tensor([0, 1, 2])
    state = trainer.generator.get_state()
    losses = trainer.compute_losses(images, labels, np.arange(3))
    trainer.generator.set_state(state)  # the same windows again
    views = build_views(images, trainer.node.MULTIVIEW, 64, trainer.generator)
    student = combine_view_logits(trainer.fused_logits(views.flatten(0, 1)).view(3, 9, -1))
    mean_s, std_s = (
        torch.tensor(v).view(3, 1, 1) for v in (trainer.bundle.mean, trainer.bundle.std)
    )
    mean_t, std_t = (torch.tensor(v).view(3, 1, 1) for v in (teacher.mean, teacher.std))
    raw = (views.flatten(0, 1) * std_s + mean_s - mean_t) / std_t
    with torch.no_grad():
        expected_teacher = combine_view_logits(teacher.compute_logits(raw).view(3, 9, -1))
    difference = torch.softmax(student, 1) - torch.softmax(expected_teacher, 1)
    value = float(losses["distillation"].detach())
    assert value == pytest.approx(float(torch.norm(difference, 2).detach()), 1e-4)
    opts = [*SMALL, "OUTPUT_DIR", str(tmp_path), "CACHE_DIR", str(shared_cache)]
    opts += ["DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "3"]
    opts += ["TRAINER.AMLPF.DISTILL.SOURCE", str(teacher_run)]
    results = execute_run(build_config(RECIPE, DATA, opts))
    assert results["status"] == "complete", results.get("error")
    assert results["training"]["distillation"]["views"] == "same"
    assert results["training"]["distillation"]["loss"] == "source_frobenius"


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL_DATA / "oral_histopath_100x").is_dir(),
    reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run this",
)
def test_paper_recipe_on_oral_histopathology(tmp_path):
    opts = ["DATASET.ROOT", str(REAL_DATA), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += ["CACHE_DIR", str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit"]
    opts += ["DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "2", "OPTIM.BATCH_SIZE", "4"]
    opts += ["INPUT.STORE_SIZE", "224", "EVAL.BATCH_SIZE", "64"]
    cfg = build_config(RECIPE, "configs/datasets/oral_scc.yaml", opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    assert results["training"]["stored_size"] == 224  # the images' own 224 x 224
    assert results["metrics"]["targets"]["400x"]["num_samples"] == 673
    assert 0.0 <= results["metrics"]["test"]["balanced_accuracy"] <= 1.0


# ----- difficulty draw (main.py:384-407) ------------------------------------------------------
def source_sample_weights(labels, drawn, drawn_logits, num_classes, gamma=2.0):
    """The source's class weights from the previous epoch's drawn samples, then
    class_weights[labels] (main.py:392-405)."""
    class_weights = torch.zeros(num_classes)
    drawn_labels = torch.as_tensor(labels)[torch.as_tensor(drawn)]
    for i in range(num_classes):
        mine = drawn_labels == i
        ce = F.cross_entropy(drawn_logits[mine], drawn_labels[mine], reduction="none")
        class_weights[i] = (1 - torch.exp(-ce)).pow(gamma).mean()
    return class_weights[torch.as_tensor(labels)]


@pytest.mark.parametrize(
    ("labels", "seed"),  # seeds whose first epoch draws every class (else the source has NaN)
    [([0, 0, 1, 1, 2, 2], 2), ([0, 0, 0, 0, 0, 1, 1, 2], 0)],
)
def test_difficulty_draw_with_the_switches_off_is_the_source_draw(labels, seed):
    from fewclip.samplers import DifficultySampler

    labels = np.array(labels)
    node = build_trainer().node  # the paper defaults: no smoothing, floor or inverse frequency
    sampler = DifficultySampler(labels, torch.Generator().manual_seed(seed), node)
    reference = torch.Generator().manual_seed(seed)
    first = sampler.epoch_indices()  # epoch 1: uniform class weights (main.py:390-391)
    uniform = torch.full((len(labels),), 1.0 / 3, dtype=torch.double)[torch.as_tensor(labels)]
    expected = torch.multinomial(uniform, len(labels), True, generator=reference)
    np.testing.assert_array_equal(first, expected.numpy())
    logits = torch.tensor(
        np.random.default_rng(0).normal(size=(len(labels), 3)) * 2, dtype=torch.float32
    )
    drawn_logits = logits[torch.as_tensor(first)]
    drawn_labels = torch.as_tensor(labels)[torch.as_tensor(first)]
    p_true = torch.softmax(drawn_logits, 1).gather(1, drawn_labels[:, None]).squeeze(1)
    for start in range(0, len(first), 3):  # the loop reports batch by batch
        sampler.update(first[start : start + 3], p_true[start : start + 3].numpy())
    second = sampler.epoch_indices()
    weights = source_sample_weights(labels, first, drawn_logits, 3).double()
    assert (torch.bincount(drawn_labels, minlength=3) > 0).all()
    ours = sampler.class_probabilities[labels] / sampler.class_probabilities[labels].sum()
    np.testing.assert_allclose(ours, (weights / weights.sum()).numpy(), rtol=1e-5)
    expected = torch.multinomial(weights, len(labels), True, generator=reference)
    np.testing.assert_array_equal(second, expected.numpy())
