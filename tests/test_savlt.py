"""SAVLT on the tiny CLIP: what trains, a step, checkpoints, ROI masks, modes, a full run."""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_command, write_oct_tree
from PIL import Image

from fewclip.augment import augment_batch
from fewclip.config import build_config
from fewclip.data import Item
from fewclip.evaluation import validation_score
from fewclip.pooling import ChannelGroupPooling, StructurePooling, compute_box_region
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run, load_clip
from fewclip.tokens import encode_image_tokens
from fewclip.trainer import ImageSet, build_param_groups
from fewclip_trainers.savlt import SAVLT

CLASS_NAMES = ["normal", "lsil", "hsil", "carcinoma"]
RECIPE = "configs/trainers/savlt.yaml"
DATASET = "configs/datasets/synthetic.yaml"
ROOT = Path(__file__).resolve().parent.parent


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


POOLING_PARAMETERS = {
    "source": {"pooling.queries", "pooling.output.weight", "pooling.output.bias"},
    "projected": {
        "pooling.queries",
        "pooling.attention.in_proj_weight",
        "pooling.attention.in_proj_bias",
        "pooling.attention.out_proj.weight",
        "pooling.attention.out_proj.bias",
    },
}


@pytest.mark.parametrize("pooling", ["source", "projected"])
def test_trains_exactly_lora_projection_prototypes_and_pooling(pooling):
    trainer = make_trainer("TRAINER.SAVLT.POOLING", pooling)
    built = {f"pooling.{name}" for name, _ in trainer.network["pooling"].named_parameters()}
    assert built == POOLING_PARAMETERS[pooling]
    expected = vision_lora_names() | {"clip.visual.proj", "prototypes.weight"} | built
    assert trainable_names(trainer) == expected
    lora = trainer.clip.visual.transformer.resblocks[0].attn.q_proj
    assert lora.rank == 8 and lora.scaling == pytest.approx(4 / 8)


def test_cls_pooling_text_lora_and_frozen_projection_change_the_trainable_set():
    trainer = make_trainer(
        "TRAINER.SAVLT.POOLING", "cls", "TRAINER.SAVLT.TRAIN_PROJECTION", "False",
        "LORA.ENCODER", "both", "LORA.TEXT_RANK", "2", "LORA.TOP_K", "1",
    )  # fmt: skip
    expected = vision_lora_names([1]) | vision_lora_names([1], "") | {"prototypes.weight"}
    assert trainable_names(trainer) == expected
    assert "pooling" not in trainer.network
    assert trainer.clip.transformer.resblocks[1].attn.q_proj.rank == 2


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
    trainer = make_trainer("TRAINER.SAVLT.ROI", "mask")  # the ROI is the mask itself
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


def source_box_patches(tissue: np.ndarray, rows: int, ratio: float = 0.1) -> set[int]:
    """Independent re-implementation of the released ROI, as its loops do it (rabbit-my/SAVLT
    get_roi.py:25-31, then model.py:187-207 with normalised float coordinates)."""
    height = tissue.shape[0]
    box = None
    for y in range(int(height * ratio), height):
        if np.all(tissue[y, :] == 1):
            box = (0.0, y / height, 1.0, 1.0)
            break
    if box is None:
        return set()
    x_min, y_min, x_max, y_max = box
    size = 1.0 / rows
    kept = set()
    for y in range(int(y_min / size), min(int(y_max / size) + 1, rows)):
        for x in range(int(x_min / size), min(int(x_max / size) + 1, rows)):
            if x_min <= x * size and (x + 1) * size <= x_max:
                if y_min <= y * size and (y + 1) * size <= y_max:
                    kept.add(y * rows + x)
    return kept


@pytest.mark.parametrize("roi", ["box", "mask"])
def test_training_masks_move_with_the_random_crop(tmp_path, roi):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[28:] = 255  # tissue from row 28 down: the box starts there, the mask rule agrees
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    items = [
        Item(f"/x/{i}.png", i % 4, CLASS_NAMES[i % 4], mask=str(tmp_path / "m.png"))
        for i in range(8)
    ]
    trainer = make_trainer("TRAINER.SAVLT.ROI", roi)
    trainer.prepare(make_images(8, items=items))
    assert trainer.train_masks is not None and trainer.train_masks[1].all()
    assert trainer.train_pixel_masks.shape == (8, 64, 64)
    # an image whose first channel is the mask itself: after the crop, the warped mask must
    # still give the ROI of the warped first channel (both moved by the same transform)
    marker = torch.zeros(8, 3, 64, 64)
    marker[:, 0, 28:] = 1.0
    state = trainer.generator.get_state()
    warped = trainer.augment(marker, np.arange(8))
    rows, columns = trainer.grid
    tissue = (warped[:, 0] > 0.5).numpy()
    if roi == "mask":
        fraction = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(tissue).float()[:, None], (rows, columns)
        )
        expected = (fraction >= 0.5).flatten(1)
    else:
        expected = torch.zeros(8, rows * columns, dtype=torch.bool)
        for index in range(8):
            expected[index, list(source_box_patches(tissue[index], rows))] = True
    assert torch.equal(trainer.batch_masks[0], expected)
    assert not torch.equal(trainer.batch_masks[0], trainer.train_masks[0])  # it did move
    trainer.generator.set_state(state)  # the images got the same crop as without masks
    expected = augment_batch(
        marker,
        trainer.generator,
        (0.75, 1.0),
        trainer.bundle.image_size,
        trainer.cfg.INPUT.CROP_INTERPOLATION,
    )
    assert torch.equal(warped, expected)
    plain = make_trainer("INPUT.AUGMENT", "none")
    plain.fit(make_images(8, items=items), None)
    assert plain.batch_masks is None and plain.train_masks[1].all()


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("POOLING", "attention", "source, projected, cls"),
        ("TOKENS", "ln", "pre_ln, post_ln"),
        ("ROI", "inside", "box, mask"),
        ("ROI_RULE", "top", "below_surface, all"),
    ],
)
def test_bad_option_names_the_key_and_the_choices(key, value, choices):
    with pytest.raises(ValueError) as error:
        make_trainer(f"TRAINER.SAVLT.{key}", value)
    message = str(error.value)
    assert message == f"TRAINER.SAVLT.{key} {value!r}: choose one of {choices}"
    assert "\n" not in message


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


# ----- the released code's formulas (rabbit-my/SAVLT), against hand-written versions ---------
def source_pool(tokens: torch.Tensor, queries: torch.Tensor, linear: torch.nn.Linear):
    """The released pooling of one image's ROI tokens (n, W), written as its loop does it
    (rabbit-my/SAVLT model.py:212-229): heads split the channels, one query per head."""
    heads, head_dim = queries.shape[1], queries.shape[2]
    multi = tokens.view(-1, heads, head_dim)
    scores = torch.sum(queries.repeat(multi.shape[0], 1, 1) * multi, dim=-1) / head_dim**0.5
    weights = torch.softmax(scores.transpose(0, 1), dim=-1)  # (heads, n)
    outputs = [weights[h] @ multi[:, h, :] for h in range(heads)]
    return torch.cat(outputs) @ linear.weight.t() + linear.bias


def test_source_pooling_has_the_source_parameter_count_and_init():
    source = ChannelGroupPooling(768, 4, torch.Generator().manual_seed(0))
    count = sum(p.numel() for p in source.parameters())
    assert count == 768 + 768 * 768 + 768 == 591_360  # 0.59 M
    projected = StructurePooling(768, 4, 4, torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in projected.parameters()) == 4 * 768 + 4 * 768 * 768 + 4 * 768
    assert source.queries.shape == (1, 4, 192)
    # xavier_uniform_ of a (1, 4, 192) tensor: fan_in 4 * 192, fan_out 192
    bound = (6 / (768 + 192)) ** 0.5
    assert source.queries.abs().max() <= bound and source.queries.abs().max() > 0.9 * bound
    same = ChannelGroupPooling(768, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), same.parameters()))


def test_source_pooling_equals_the_hand_written_loop(caplog):
    pooling = ChannelGroupPooling(8, 2, torch.Generator().manual_seed(0))
    tokens = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(1))
    region = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]).bool()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        pooled, weights = pooling(tokens, region)
        expected = torch.stack(
            [
                source_pool(tokens[0, region[0]], pooling.queries, pooling.output),
                source_pool(tokens[1, region[1]], pooling.queries, pooling.output),
                source_pool(tokens[2], pooling.queries, pooling.output),  # empty: all patches
            ]
        )
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert "1 of 3 images have an empty region" in caplog.text
    assert weights.shape == (3, 2, 6) and torch.all(weights[0][:, ~region[0]] == 0)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3, 2))


def test_pre_ln_tokens_and_the_feature_equal_a_manual_forward():
    trainer = make_trainer()  # the recipe: source pooling of the tokens before ln_post
    with torch.no_grad():
        for name, parameter in trainer.network.named_parameters():
            if ".lora_B." in name:  # non-zero deltas: the LoRA path really runs
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
    trainer.network.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    region = torch.zeros(2, 64, dtype=torch.bool)
    region[0, 16:] = True
    region[1, :40] = True
    visual = trainer.clip.visual
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1)
        x = visual.transformer(visual.ln_pre(x + visual.positional_embedding))
        tokens = x[:, 1:]  # the last block's patch tokens, no ln_post
        _, ours = encode_image_tokens(trainer.clip, images, final_norm=False)
        _, after = encode_image_tokens(trainer.clip, images)
        pooling = trainer.network["pooling"]
        expected = []
        for index in range(2):
            pooled = source_pool(tokens[index, region[index]], pooling.queries, pooling.output)
            feature = pooled @ visual.proj  # the visual projection, then L2 (model.py:230-232)
            expected.append(feature / (feature.norm() + 1e-6))
        features = trainer.compute_image_features(images, (region, torch.ones(2).bool()))
    assert torch.allclose(ours, tokens, atol=1e-6)
    assert torch.allclose(after, visual.ln_post(tokens), atol=1e-6)
    assert not torch.allclose(ours, after, atol=1e-2)
    assert torch.allclose(features, torch.stack(expected), atol=1e-5)


def hand_made_masks() -> np.ndarray:
    """Four 64 x 64 tissue masks (1 = tissue) with known first full rows."""
    masks = np.zeros((4, 64, 64), dtype=np.uint8)
    masks[0, :6] = 1  # a full row above 10 % of the height (int(6.4) = 6): not searched
    masks[0, 6:20, :40] = 1  # partial rows
    masks[0, 20:] = 1  # first full row at or below row 6: 20
    masks[1, 24:] = 1  # 24: exactly the top of patch row 3
    masks[2, 25:] = 1  # 25: patch row 3 starts above it, so only rows 4..7
    masks[3, 10:] = 1
    masks[3, :, 30] = 0  # a dark column: no row is tissue edge to edge
    return masks


def test_box_roi_picks_the_patches_below_the_first_full_tissue_row(tmp_path):
    masks = hand_made_masks()
    region = compute_box_region(torch.from_numpy(masks).bool(), (8, 8))
    expected = [set(range(24, 64)), set(range(24, 64)), set(range(32, 64)), set()]
    for index in range(4):
        assert set(np.flatnonzero(region[index].numpy())) == expected[index]
        assert source_box_patches(masks[index], 8) == expected[index]
    # from mask files, through the trainer: masks -> box ROI on the patch grid
    items = []
    for index in range(4):
        Image.fromarray(masks[index] * 255, mode="L").save(tmp_path / f"m{index}.png")
        items.append(
            Item(f"/x/{index}.png", 0, CLASS_NAMES[0], mask=str(tmp_path / f"m{index}.png"))
        )
    items.append(Item("/x/none.png", 0, CLASS_NAMES[0]))  # no mask: the ROI_RULE
    trainer = make_trainer()
    images = trainer.input_tensor(make_images(5, seed=3).images)
    rois = trainer.region(images, trainer.masks_for(items))
    assert torch.equal(rois[:4], region)
    assert torch.equal(rois[4], trainer.region(images, None)[4])
    mask_rule = make_trainer("TRAINER.SAVLT.ROI", "mask")
    inside = mask_rule.region(images, mask_rule.masks_for(items))
    assert set(np.flatnonzero(inside[1].numpy())) == set(range(24, 64))
    assert inside[0].view(8, 8)[0].all()  # the mask rule keeps the tissue above 10 %


def test_paper_recipe_runs_through_the_cli_on_generated_oct_data(tmp_path, shared_cache):
    root = write_oct_tree(tmp_path / "oct", per_class=8)
    for center in ("mixed", "huaxi"):  # xiangya has no masks: the ROI_RULE fallback
        for image in (root / center / "images").rglob("*.png"):
            mask = np.zeros((8, 8), dtype=np.uint8)
            mask[2 + int(image.stem.split("_")[-1]) % 3 :] = 255
            target = root / center / "masks" / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(target)
    output = tmp_path / "out"
    args = [
        "--recipe", RECIPE,
        "--dataset-config", "configs/datasets/cervical_oct.yaml", "--shots", "2", "--seeds", "1",
        "DATASET.ROOT", str(root), "DATASET.PROMPT_FILE", "configs/prompts/cervical_oct_savlt.yaml",
        "DATASET.VAL_SHOTS", "0", "MODEL.NAME", "tiny-vit", "OPTIM.MAX_ITERS", "3",
        "OPTIM.BATCH_SIZE", "8", "OUTPUT_DIR", str(output), "CACHE_DIR", str(shared_cache),
    ]  # fmt: skip
    results = run_command(args, output)
    assert results["status"] == "complete"
    assert set(results["metrics"]["targets"]) == {"huaxi", "xiangya"}
    assert results["metrics"]["targets"]["huaxi"]["num_samples"] == 40
    node = results["config"]["TRAINER"]["SAVLT"]
    assert (node["POOLING"], node["TOKENS"], node["ROI"]) == ("source", "pre_ln", "box")
    assert results["config"]["INPUT"]["CROP_SCALE"] == [0.75, 1.0]


REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL_DATA / "herlev").is_dir(),
    reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run this",
)
def test_paper_recipe_on_real_herlev_images(tmp_path):
    """The shared data has no OCT and no masks: every image takes the ROI_RULE fallback."""
    opts = [
        "DATASET.ROOT", str(REAL_DATA / "herlev"), "OUTPUT_DIR", str(tmp_path / "out"),
        "CACHE_DIR", str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit",
        "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "3", "OPTIM.BATCH_SIZE", "8",
    ]  # fmt: skip
    results = execute_run(build_config(RECIPE, "configs/datasets/herlev.yaml", opts))
    assert results["status"] == "complete", results.get("traceback")
    assert results["metrics"]["test"]["num_samples"] > 200
    assert 0.0 <= results["metrics"]["test"]["balanced_accuracy"] <= 1.0
