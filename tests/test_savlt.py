"""SAVLT on the tiny CLIP: what trains, a step, checkpoints, ROI masks, modes, a full run."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewclip.config import build_config
from fewclip.data import Item
from fewclip.evaluation import validation_score
from fewclip.images import augment_batch
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run, load_clip
from fewclip.trainer import ImageSet, build_param_groups
from fewclip_trainers.savlt import SAVLT

CLASS_NAMES = ["normal", "lsil", "hsil", "carcinoma"]
RECIPE = "configs/trainers/savlt.yaml"
DATASET = "configs/datasets/synthetic.yaml"


def make_trainer(*opts: str) -> SAVLT:
    cfg = build_config(RECIPE, DATASET, ["OPTIM.MAX_ITERS", "2", "OPTIM.BATCH_SIZE", "8", *opts])
    dataset = types.SimpleNamespace(
        class_names=CLASS_NAMES,
        prompts=load_prompt_file("configs/prompts/synthetic.yaml", CLASS_NAMES),
    )
    return SAVLT(cfg, load_clip(cfg), dataset, torch.device("cpu"))


def make_images(count: int, seed: int = 0, items: list[Item] | None = None) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(count) % len(CLASS_NAMES)
    return ImageSet(images, labels, ["a"] * count, items or [])


def trainable_names(trainer: SAVLT) -> set[str]:
    return {name for name, _ in trainer.trainable_named_parameters()}


def vision_lora_names(blocks=(0, 1), encoder="visual.") -> set[str]:
    return {
        f"clip.{encoder}transformer.resblocks.{block}.attn.{target}_proj.lora_{side}.default.weight"
        for block in blocks
        for target in ("q", "k", "v", "out")
        for side in "AB"
    }


def test_trains_exactly_lora_projection_prototypes_and_pooling():
    trainer = make_trainer()
    pooling = {f"pooling.{name}" for name, _ in trainer.network["pooling"].named_parameters()}
    expected = vision_lora_names() | {"clip.visual.proj", "prototypes.weight"} | pooling
    assert trainable_names(trainer) == expected
    assert pooling == {
        "pooling.queries",
        "pooling.attention.in_proj_weight",
        "pooling.attention.in_proj_bias",
        "pooling.attention.out_proj.weight",
        "pooling.attention.out_proj.bias",
    }
    lora = trainer.clip.visual.transformer.resblocks[0].attn.q_proj
    assert lora.r["default"] == 8 and lora.scaling["default"] == pytest.approx(4 / 8)


def test_cls_pooling_text_lora_and_frozen_projection_change_the_trainable_set():
    trainer = make_trainer(
        "TRAINER.SAVLT.POOLING", "cls", "TRAINER.SAVLT.TRAIN_PROJECTION", "False",
        "LORA.ENCODER", "both", "LORA.TEXT_RANK", "2", "LORA.TOP_K", "1",
    )  # fmt: skip
    expected = vision_lora_names([1]) | vision_lora_names([1], "") | {"prototypes.weight"}
    assert trainable_names(trainer) == expected
    assert "pooling" not in trainer.network
    assert trainer.clip.transformer.resblocks[1].attn.q_proj.r["default"] == 2


def test_step_updates_trainables_only_and_optimizer_gets_each_parameter_once():
    trainer = make_trainer()
    named = trainer.trainable_named_parameters()
    groups = build_param_groups(named, 1e-4)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for _, p in named})
    every = [id(p) for p in trainer.network.parameters()]
    assert len(every) == len(set(every))  # no module registers a parameter twice
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    report = trainer.fit(make_images(8), None)
    assert report["iterations"] == 2 and np.isfinite(report["final_loss"])
    after = dict(trainer.network.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert {"clip.visual.proj", "prototypes.weight", "pooling.queries"} <= changed
    assert changed <= trainable_names(trainer)


def test_checkpoint_round_trip_gives_the_same_logits():
    trainer = make_trainer()
    trainer.fit(make_images(8), None)
    data = make_images(6, seed=1)
    probabilities = trainer.predict_probabilities(data)
    fresh = make_trainer()
    assert not np.allclose(fresh.predict_probabilities(data), probabilities)
    fresh.load_checkpoint_state(trainer.checkpoint_state())
    assert np.allclose(fresh.predict_probabilities(data), probabilities, atol=1e-6)


def write_mask(path: Path, rows: slice) -> str:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[rows] = 255
    Image.fromarray(mask, mode="L").save(path)
    return str(path)


def test_masks_define_the_region_at_evaluation_and_validation_restores_train_mode(tmp_path, caplog):
    trainer = make_trainer()
    top = write_mask(tmp_path / "top.png", slice(0, 32))
    empty = write_mask(tmp_path / "empty.png", slice(0, 0))
    items = [
        Item(f"/x/{i}.png", i % 4, CLASS_NAMES[i % 4], mask=mask)
        for i, mask in enumerate([top, "", empty, top])
    ]
    data = make_images(4, seed=2, items=items)
    images = trainer.input_tensor(data.images)
    masks = trainer.masks_for(items)
    region = trainer.region(images, masks)
    assert region[0].view(8, 8)[:4].all() and not region[0].view(8, 8)[4:].any()
    rule = trainer.region(images, None)
    assert torch.equal(region[1], rule[1]) and not region[2].any()
    trainer.network.train()
    with caplog.at_level(logging.WARNING):
        probabilities = trainer.predict_probabilities(data)
    assert "empty region of interest" in caplog.text  # the empty mask fell back, no crash
    assert trainer.network.training and trainer.clip.visual.training
    with torch.no_grad():
        trainer.network.eval()
        trainer.on_eval_start()
        direct = torch.softmax(trainer.compute_logits(images, items), dim=-1).numpy()
        plain = torch.softmax(trainer.compute_logits(images), dim=-1).numpy()
    assert np.allclose(probabilities, direct, atol=1e-6)
    assert not np.allclose(probabilities[0], plain[0])
    trainer.network.train()
    validation_score(trainer, data)
    assert trainer.network.training


def test_training_masks_move_with_the_random_crop(tmp_path):
    items = [
        Item(
            f"/x/{i}.png",
            i % 4,
            CLASS_NAMES[i % 4],
            mask=write_mask(tmp_path / "m.png", slice(0, 32)),
        )
        for i in range(8)
    ]
    trainer = make_trainer()
    trainer.prepare(make_images(8, items=items))
    assert trainer.train_masks is not None and trainer.train_masks[1].all()
    # an image whose first channel is the mask itself: after the crop, the warped mask must
    # still mark the patches where that channel is bright (both moved by the same transform)
    marker = torch.zeros(8, 3, 64, 64)
    marker[:, 0, :32] = 1.0
    state = trainer.generator.get_state()
    warped = trainer.augment(marker, np.arange(8))
    rows, columns = trainer.grid
    expected = torch.nn.functional.adaptive_avg_pool2d(warped[:, :1], (rows, columns)) > 0.5
    assert torch.equal(trainer.batch_masks[0], expected.flatten(1))
    assert not torch.equal(trainer.batch_masks[0], trainer.train_masks[0])  # it did move
    trainer.generator.set_state(state)  # the images got the same crop as without masks
    assert torch.equal(warped, augment_batch(marker, trainer.generator, (0.5, 1.0)))
    plain = make_trainer("INPUT.AUGMENT", "none")
    plain.fit(make_images(8, items=items), None)
    assert plain.batch_masks is None and plain.train_masks[1].all()


def test_bad_pooling_is_named():
    with pytest.raises(ValueError, match="TRAINER.SAVLT.POOLING"):
        make_trainer("TRAINER.SAVLT.POOLING", "max")


def test_end_to_end_run_on_synthetic_data(fast_opts):
    results = execute_run(build_config(RECIPE, DATASET, fast_opts))
    assert results["status"] == "complete", results.get("traceback")
    assert 0.0 <= results["metrics"]["test"]["accuracy"] <= 1.0
    assert set(results["metrics"]["targets"]) == {"center_b", "center_c"}
    assert (Path(results["run_dir"]) / "checkpoint.safetensors").is_file()


def test_end_to_end_run_with_mask_column(tmp_path, shared_cache, monkeypatch):
    """A CSV dataset with ROI masks: the masks reach evaluation through the decoded-image store."""
    seen, original = [], SAVLT.masks_for

    def spy(self, items):
        masks = original(self, items)
        seen.append((len(items), masks is not None and bool(masks[1].all())))
        return masks

    monkeypatch.setattr(SAVLT, "masks_for", spy)
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,label,split,mask"]
    rng = np.random.default_rng(5)
    for index in range(10):
        label, split = ("normal", "tumor")[index % 2], ("train", "train", "val", "test", "test")
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"x{index}.png")
        mask = write_mask(data / f"m{index}.png", slice(0, 16 + 4 * index))
        rows.append(f"x{index}.png,{label},{split[index // 2]},{Path(mask).name}")
    (data / "table.csv").write_text("\n".join(rows) + "\n")
    opts = [
        "OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR", str(shared_cache),
        "DATASET.CSV.FILE", str(data / "table.csv"), "DATASET.NUM_SHOTS", "2",
        "OPTIM.MAX_ITERS", "2", "INPUT.AUGMENT", "none",
    ]  # fmt: skip
    results = execute_run(build_config(RECIPE, "configs/datasets/csv_example.yaml", opts))
    assert results["status"] == "complete", results.get("traceback")
    assert results["metrics"]["test"]["num_samples"] == 4
    assert (4, True) in seen  # the test images were predicted with their masks
