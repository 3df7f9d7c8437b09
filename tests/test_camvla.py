"""CaM-VLA on the tiny CLIP: what trains, its losses, test-time logits, attention maps, a run."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fewclip.config import build_config
from fewclip.data import Item
from fewclip.evaluation import validation_score
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run, load_clip
from fewclip.trainer import ImageSet, build_param_groups
from fewclip_trainers.camvla import (
    CaMVLA,
    render_attention_overlay,
    save_attention_maps,
    select_attention_images,
)

CLASS_NAMES = ["normal", "lsil", "hsil", "carcinoma"]
RECIPE = "configs/trainers/camvla.yaml"
DATASET = "configs/datasets/synthetic.yaml"
PROMPTS = load_prompt_file("configs/prompts/synthetic.yaml", CLASS_NAMES)


def make_trainer(*opts: str) -> CaMVLA:
    cfg = build_config(RECIPE, DATASET, ["OPTIM.MAX_ITERS", "2", "OPTIM.BATCH_SIZE", "8", *opts])
    dataset = types.SimpleNamespace(class_names=CLASS_NAMES, prompts=PROMPTS)
    return CaMVLA(cfg, load_clip(cfg), dataset, torch.device("cpu"))


def make_images(count: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(count) % len(CLASS_NAMES)
    items = [
        Item(f"/data/c/img_{i}.png", int(labels[i]), CLASS_NAMES[labels[i]]) for i in range(count)
    ]
    return ImageSet(images, labels, ["a"] * count, items)


def test_trains_exactly_vision_lora_and_both_cross_attention_modules():
    trainer = make_trainer()
    lora = {
        f"clip.visual.transformer.resblocks.{block}.attn.{target}_proj.lora_{side}.default.weight"
        for block in (0, 1)
        for target in ("q", "k", "v", "out")
        for side in "AB"
    }
    modules = {
        f"alignment.{direction}.{layer}.{kind}"
        for direction in ("text_to_vision", "vision_to_text")
        for layer in ("query_norm", "key_norm", "q_proj", "k_proj", "v_proj", "out_proj")
        for kind in ("weight", "bias")
    }
    assert {name for name, _ in trainer.trainable_named_parameters()} == lora | modules
    named = trainer.trainable_named_parameters()
    ids = [id(p) for group in build_param_groups(named, 1e-4) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(named)


def test_losses_are_weighted_and_reach_both_modules():
    trainer = make_trainer()
    data = make_images(8)
    trainer.prepare(data)
    trainer.network.train()
    images = trainer.input_tensor(data.images)
    labels = torch.as_tensor(data.labels)
    losses = trainer.compute_losses(images, labels, np.arange(8))
    assert set(losses) == {"matching", "text_to_vision", "vision_to_text"}
    sum(losses.values()).backward()
    for direction in ("text_to_vision", "vision_to_text"):
        gradient = getattr(trainer.network["alignment"], direction).q_proj.weight.grad
        assert gradient is not None and gradient.abs().sum() > 0
    halved = make_trainer("TRAINER.CAMVLA.TEXT_TO_VISION_WEIGHT", "0.25",
                          "TRAINER.CAMVLA.VISION_TO_TEXT_WEIGHT", "0.0")  # fmt: skip
    halved.prepare(data)
    halved.network.train()
    other = halved.compute_losses(images, labels, np.arange(8))
    assert set(other) == {"matching", "text_to_vision"}
    assert other["text_to_vision"].item() == pytest.approx(losses["text_to_vision"].item() / 2)


def test_test_time_logits_are_the_cross_modal_similarity():
    trainer = make_trainer()
    data = make_images(4)
    texts = [entry["description"] for entry in PROMPTS.classes.values()]
    with torch.no_grad():
        images = trainer.input_tensor(data.images)
        image = F.normalize(trainer.clip.encode_image(images), dim=-1)
        text = F.normalize(trainer.clip.encode_text(trainer.bundle.tokenizer(texts)), dim=-1)
    expected = torch.softmax(100.0 * image @ text.t(), dim=-1).numpy()
    assert np.allclose(trainer.predict_probabilities(data), expected, atol=1e-5)


def test_step_checkpoint_round_trip_and_train_mode_after_validation():
    trainer = make_trainer()
    before = trainer.network["alignment"].text_to_vision.q_proj.weight.detach().clone()
    trainer.fit(make_images(8), None)
    assert not torch.equal(before, trainer.network["alignment"].text_to_vision.q_proj.weight)
    data = make_images(4, seed=1)
    probabilities = trainer.predict_probabilities(data)
    fresh = make_trainer()
    fresh.load_checkpoint_state(trainer.checkpoint_state())
    assert np.allclose(fresh.predict_probabilities(data), probabilities, atol=1e-6)
    trainer.network.train()
    validation_score(trainer, data)
    assert trainer.network.training


def test_attention_maps_cover_the_patch_grid_and_are_written_as_png(tmp_path):
    trainer = make_trainer()
    data = make_images(3)
    with torch.inference_mode():
        trainer.on_eval_start()
        maps, classes = trainer.compute_attention_maps(
            trainer.input_tensor(data.images), torch.tensor([0, 1, 2])
        )
    assert maps.shape == (3, 8, 8) and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(3))
    assert classes.tolist() == [0, 1, 2]
    trainer.network.train()
    written = save_attention_maps(trainer, data.images, ["a/x.png", "b/y.png", "c/z.png"], tmp_path)
    assert [path.name.split("_")[:2] for path in written] == [
        ["000", "x"],
        ["001", "y"],
        ["002", "z"],
    ]
    assert all(path.is_file() for path in written) and trainer.network.training
    assert np.asarray(Image.open(written[0])).shape == (64, 128, 3)


def test_overlay_keeps_the_image_and_colours_the_map():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    attention = np.array([[0.0, 0.0], [0.0, 1.0]])
    overlay = render_attention_overlay(image, attention)
    assert overlay.shape == (4, 8, 3) and np.all(overlay[:, :4] == 100)
    assert not np.array_equal(overlay[0, 4], overlay[3, 7])  # low and high attention differ


def test_select_attention_images():
    paths = ["/d/a/1.png", "/d/b/2.png", "/d/b/3.png", "/d/c/4.png", "/d/c/5.png"]
    assert select_attention_images(paths, 5, [], 0) == []
    assert select_attention_images(paths, 5, [], 3) == [0, 2, 4]
    assert select_attention_images(paths, 5, [], 9) == [0, 1, 2, 3, 4]
    assert select_attention_images(paths, 5, ["c/4.png", "/d/a/1.png"], 0) == [3, 0]
    with pytest.raises(ValueError, match="ATTENTION_IMAGES not in the test set"):
        select_attention_images(paths, 5, ["z/9.png"], 0)


def test_save_artifacts_follows_the_config(tmp_path):
    data = make_images(6)
    assert make_trainer().save_artifacts(tmp_path / "none", data) == []
    assert not (tmp_path / "none").exists()
    counted = make_trainer("TRAINER.CAMVLA.ATTENTION_MAPS", "2")
    written = counted.save_artifacts(tmp_path / "run", data)
    assert len(written) == 2 and all(
        p.parent == tmp_path / "run" / "attention_maps" for p in written
    )
    assert counted.report["attention_maps"] == [f"attention_maps/{p.name}" for p in written]
    listed = make_trainer("TRAINER.CAMVLA.ATTENTION_IMAGES", "c/img_4.png")
    (path,) = listed.save_artifacts(tmp_path / "listed", data)
    assert path.name.startswith("000_img_4_") and path.is_file()


def test_end_to_end_run_on_synthetic_data(fast_opts):
    results = execute_run(build_config(RECIPE, DATASET, fast_opts))
    assert results["status"] == "complete", results.get("traceback")
    assert 0.0 <= results["metrics"]["test"]["accuracy"] <= 1.0
    assert (Path(results["run_dir"]) / "checkpoint.safetensors").is_file()
