"""CaM-VLA on the tiny CLIP: the source's loss and attention against hand-written formulas, what
trains under each option, test-time logits, attention maps, runs through the CLI and on Herlev."""

from __future__ import annotations

import math
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_command
from PIL import Image

from fewclip.config import build_config
from fewclip.contrastive import (
    PatchAdapter,
    SourceAlignment,
    build_alignment,
    compute_multi_positive_infonce,
)
from fewclip.data import Item
from fewclip.evaluation import validation_score
from fewclip.prompts import load_prompt_file
from fewclip.run import execute_run, load_clip
from fewclip.trainer import ImageSet, build_param_groups
from fewclip_trainers.camvla import (
    CaMVLA,
    attention_title,
    save_attention_maps,
    select_attention_images,
)

ROOT = Path(__file__).resolve().parent.parent
CLASS_NAMES = ["normal", "lsil", "hsil", "carcinoma"]
RECIPE = "configs/trainers/camvla.yaml"
VARIANT = "configs/trainers/camvla_lora.yaml"
DATASET = "configs/datasets/synthetic.yaml"
PROMPTS = load_prompt_file("configs/prompts/synthetic.yaml", CLASS_NAMES)
REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))


def make_trainer(*opts: str, recipe: str = RECIPE) -> CaMVLA:
    cfg = build_config(recipe, DATASET, ["OPTIM.MAX_ITERS", "2", "OPTIM.BATCH_SIZE", "8", *opts])
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


# ----- the loss against the source's formula, written out element by element --------------------
def reference_losses(first: torch.Tensor, second: torch.Tensor, labels: list[int], tau: float):
    """(source, supcon_out) in float64 loops: the source's -log sum_{p in P} softmax (lines
    178-190) and SupCon L_out's -1/|P| sum_{p in P} log softmax, each averaged over both ways."""
    a = [[float(x) for x in row] for row in F.normalize(first.double(), dim=-1)]
    b = [[float(x) for x in row] for row in F.normalize(second.double(), dim=-1)]
    size = len(labels)
    z = [[sum(p * q for p, q in zip(a[i], b[j])) / tau for j in range(size)] for i in range(size)]
    totals = {"source": 0.0, "supcon_out": 0.0}
    for scores in (z, [list(column) for column in zip(*z)]):
        for i in range(size):
            denominator = sum(math.exp(s) for s in scores[i])
            softmax = [math.exp(s) / denominator for s in scores[i]]
            positives = [j for j in range(size) if labels[j] == labels[i]]
            totals["source"] += -math.log(sum(softmax[j] for j in positives)) / size
            supcon = -sum(math.log(softmax[j]) for j in positives) / len(positives)
            totals["supcon_out"] += supcon / size
    return totals["source"] / 2, totals["supcon_out"] / 2


@pytest.mark.parametrize("tau", [0.07, 0.1])
def test_loss_forms_equal_the_hand_written_formulas(tau):
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    labels = [0, 1, 2, 3, 0, 1, 2, 0]  # 4 classes, |P| of 3, 2, 2 and 1
    source, supcon = reference_losses(first, second, labels, tau)
    label_tensor = torch.tensor(labels)
    ours = compute_multi_positive_infonce(first, second, label_tensor, tau)  # default: source
    assert ours.item() == pytest.approx(source, rel=1e-5)
    ours_out = compute_multi_positive_infonce(first, second, label_tensor, tau, "supcon_out")
    assert ours_out.item() == pytest.approx(supcon, rel=1e-5)
    assert source < supcon  # log of a sum >= mean of logs: the two forms really differ here
    distinct = torch.arange(8)  # one positive each: both are CLIP's symmetric InfoNCE
    scores = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).t() / tau
    clip = 0.5 * (F.cross_entropy(scores, distinct) + F.cross_entropy(scores.t(), distinct))
    for loss in ("source", "supcon_out"):
        value = compute_multi_positive_infonce(first, second, distinct, tau, loss)
        assert value.item() == pytest.approx(clip.item(), rel=1e-5)


# ----- the source's parameter-free attention, written out ---------------------------------------
def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_source_attention_equals_softmax_qk_over_sqrt_d_and_has_no_parameters():
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(2, 4, generator=generator)
    patches = torch.randn(2, 6, 4, generator=generator)
    words = torch.randn(2, 5, 4, generator=generator)
    valid = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    alignment = build_alignment("source", 4, 2)
    assert isinstance(alignment, SourceAlignment) and not list(alignment.parameters())
    anchor, visual, maps = alignment.attend_text_to_vision(text, words, valid, patches)
    for b in range(2):  # one query, the unit class text, over the unit patches (lines 163-171)
        q, keys = unit(text[b]), unit(patches[b])
        weights = torch.softmax(keys @ q / 2.0, dim=0)  # sqrt(D) = 2
        assert torch.allclose(maps[b], weights, atol=1e-6)
        assert torch.allclose(visual[b], unit(weights @ keys), atol=1e-6)
        assert torch.allclose(anchor[b], q, atol=1e-6)
    anchor, textual, weights_out = alignment.attend_vision_to_text(text, patches, words, valid)
    for b in range(2):  # one query, the unit mean patch, over the unit class words (193-201)
        q, kept = unit(patches[b].mean(dim=0)), unit(words[b][valid[b]])
        weights = torch.softmax(kept @ q / 2.0, dim=0)
        assert torch.allclose(weights_out[b][valid[b]], weights, atol=1e-6)
        assert torch.all(weights_out[b][~valid[b]] == 0)
        assert torch.allclose(textual[b], unit(weights @ kept), atol=1e-6)
        assert torch.allclose(anchor[b], q, atol=1e-6)


def test_patch_adapter_is_the_source_conv_bn_stack_on_the_row_major_grid():
    adapter = PatchAdapter(4, (2, 3)).eval()
    kinds = [type(layer).__name__ for layer in adapter.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    shapes = [tuple(p.shape) for p in adapter.parameters()]  # no conv biases
    assert shapes == [(4, 4, 3, 3), (4,), (4,), (4, 4, 1, 1), (4,), (4,)]
    patches = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2))
    grid = torch.stack([patches[:, r * 3 : (r + 1) * 3].transpose(1, 2) for r in range(2)], dim=2)
    expected = adapter.layers(grid)  # (B, D, rows, columns) built row by row by hand
    out = adapter(patches)
    assert torch.allclose(out[:, 4], expected[:, :, 1, 1], atol=1e-6)
    assert torch.allclose(out[:, 2], expected[:, :, 0, 2], atol=1e-6)


# ----- options: what each builds and trains -----------------------------------------------------
def trainable_names(trainer: CaMVLA) -> set[str]:
    return {name for name, _ in trainer.trainable_named_parameters()}


def test_paper_recipe_trains_the_visual_tower_text_projection_and_adapter():
    trainer = make_trainer()
    visual = {f"clip.{n}" for n, _ in trainer.clip.named_parameters() if n.startswith("visual.")}
    adapter = {f"adapter.{n}" for n, _ in trainer.network["adapter"].named_parameters()}
    assert trainable_names(trainer) == visual | adapter | {"clip.text_projection"}
    assert not list(trainer.network["alignment"].parameters())
    node = trainer.node
    assert (node.LOSS, node.ATTENTION, node.ADAPTER, node.TUNING) == (
        "source", "source", "conv_bn", "source",
    )  # fmt: skip
    assert (node.LOGIT_SCALE, node.TEMPERATURE) == (10.0, 0.1)
    recipe = build_config(RECIPE, DATASET)
    optim = recipe.OPTIM  # the source's AdamW, cosine, 60 epochs, best-validation checkpoint
    assert (recipe.EVAL.SELECT, recipe.EVAL.VAL_EVERY) == ("best_val", 1)
    assert (optim.LR, optim.WEIGHT_DECAY, optim.MIN_LR, optim.BATCH_SIZE) == (2e-5, 0.05, 1e-8, 64)
    assert (optim.MAX_ITERS, optim.WARMUP_ITERS, optim.WARMUP_FRACTION) == (60, 0, 0.4)
    named = trainer.trainable_named_parameters()
    ids = [id(p) for group in build_param_groups(named, 1e-4) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(named)


def test_lora_variant_trains_exactly_vision_lora_and_both_cross_attention_modules():
    trainer = make_trainer(recipe=VARIANT)
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
    assert trainable_names(trainer) == lora | modules
    mixed = make_trainer("TRAINER.CAMVLA.ATTENTION", "source", recipe=VARIANT)
    assert trainable_names(mixed) == lora and "adapter" not in mixed.network


@pytest.mark.parametrize("key", ["LOSS", "ATTENTION", "ADAPTER", "TUNING"])
def test_an_unknown_option_names_the_key_and_the_choices(key):
    choices = {
        "LOSS": "source, supcon_out",
        "ATTENTION": "source, learned",
        "ADAPTER": "conv_bn, none",
        "TUNING": "source, lora",
    }[key]
    message = f"TRAINER.CAMVLA.{key} is 'bogus'; choose one of {choices}"
    with pytest.raises(ValueError, match=message):
        make_trainer(f"TRAINER.CAMVLA.{key}", "bogus")


@pytest.mark.parametrize("recipe", [RECIPE, VARIANT])
def test_losses_are_weighted_and_reach_what_trains(recipe):
    trainer = make_trainer(recipe=recipe)
    data = make_images(8)
    trainer.prepare(data)
    trainer.network.train()
    images = trainer.input_tensor(data.images)
    labels = torch.as_tensor(data.labels)
    losses = trainer.compute_losses(images, labels, np.arange(8))
    assert set(losses) == {"matching", "text_to_vision", "vision_to_text"}
    sum(losses.values()).backward()
    trained = dict(trainer.trainable_named_parameters())  # lora_A: zero-initialised B blocks it
    without_gradient = [
        n for n, p in trained.items() if "lora_A" not in n and (p.grad is None or not p.grad.any())
    ]
    assert not without_gradient, without_gradient[:5]
    halved = make_trainer("TRAINER.CAMVLA.TEXT_TO_VISION_WEIGHT", "0.25",
                          "TRAINER.CAMVLA.VISION_TO_TEXT_WEIGHT", "0.0", recipe=recipe)  # fmt: skip
    halved.prepare(data)
    halved.network.train()
    other = halved.compute_losses(images, labels, np.arange(8))
    assert set(other) == {"matching", "text_to_vision"}
    assert other["text_to_vision"].item() == pytest.approx(losses["text_to_vision"].item() / 2)


@pytest.mark.parametrize(("recipe", "scale"), [(RECIPE, 10.0), (VARIANT, 100.0)])
def test_test_time_logits_are_the_cross_modal_similarity(recipe, scale):
    trainer = make_trainer(recipe=recipe)
    data = make_images(4)
    texts = [entry["description"] for entry in PROMPTS.classes.values()]
    with torch.no_grad():
        images = trainer.input_tensor(data.images)
        image = F.normalize(trainer.clip.encode_image(images), dim=-1)
        text = F.normalize(trainer.clip.encode_text(trainer.bundle.tokenizer(texts)), dim=-1)
    expected = torch.softmax(scale * image @ text.t(), dim=-1).numpy()
    assert np.allclose(trainer.predict_probabilities(data), expected, atol=1e-5)


@pytest.mark.parametrize("recipe", [RECIPE, VARIANT])
def test_step_checkpoint_round_trip_and_train_mode_after_validation(recipe):
    opts = ("OPTIM.LR", "1e-3", "OPTIM.WARMUP_ITERS", "0")
    trainer = make_trainer(*opts, recipe=recipe)
    before = {n: p.detach().clone() for n, p in trainer.trainable_named_parameters()}
    trainer.fit(make_images(8), None)
    changed = [n for n, p in trainer.trainable_named_parameters() if not torch.equal(p, before[n])]
    assert changed
    data = make_images(4, seed=1)
    probabilities = trainer.predict_probabilities(data)
    fresh = make_trainer(*opts, recipe=recipe)
    fresh.load_checkpoint_state(trainer.checkpoint_state())
    assert np.allclose(fresh.predict_probabilities(data), probabilities, atol=1e-6)
    if recipe == RECIPE:  # the adapter's BatchNorm statistics travel with the checkpoint
        trainer.network.eval(), fresh.network.eval()  # BatchNorm on running statistics
        with torch.inference_mode():
            trainer.on_eval_start(), fresh.on_eval_start()
            ours, _ = trainer.compute_attention_maps(trainer.input_tensor(data.images))
            theirs, _ = fresh.compute_attention_maps(fresh.input_tensor(data.images))
        assert torch.allclose(ours, theirs, atol=1e-6)
    trainer.network.train()
    validation_score(trainer, data)
    assert trainer.network.training


# ----- attention maps ---------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [RECIPE, VARIANT])
def test_attention_maps_cover_the_patch_grid_and_are_written_as_png(tmp_path, recipe):
    trainer = make_trainer(recipe=recipe)
    data = make_images(3)
    trainer.network.eval()
    with torch.inference_mode():
        trainer.on_eval_start()
        images = trainer.input_tensor(data.images)
        maps, classes = trainer.compute_attention_maps(images, torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 8, 8) and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(3))
    assert classes.tolist() == [0, 1, 2]
    if recipe == RECIPE:  # softmax(<t_c, p_n> / sqrt(D)) over the adapted unit patches
        with torch.inference_mode():
            _, patches = trainer.encode_images(images)
            text = trainer.eval_text[0][:3]
            scores = torch.einsum("bd,bnd->bn", unit(text), unit(patches)) / math.sqrt(64)
        assert torch.allclose(maps.view(3, -1), scores.softmax(dim=-1), atol=1e-6)
    trainer.network.train()
    written = save_attention_maps(trainer, data.images, ["a/x.png", "b/y.png", "c/z.png"], tmp_path)
    assert [path.name.split("_")[:2] for path in written] == [
        ["000", "x"],
        ["001", "y"],
        ["002", "z"],
    ]
    assert all(path.is_file() for path in written) and trainer.network.training
    assert all("_pred-" in path.name for path in written)
    height, width = np.asarray(Image.open(written[0])).shape[:2]
    assert width >= 600 and height >= 300  # readable, not the 64 px input


def test_attention_title_names_the_true_class_and_the_prediction():
    assert attention_title("/d/hsil/cell_7.png", "hsil", "lsil", 0.625) == (
        "cell_7.png · true: hsil · predicted: lsil (p = 0.62)"
    )
    assert attention_title("x.png", None, "normal", 0.9) == "x.png · predicted: normal (p = 0.90)"


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


# ----- whole runs -------------------------------------------------------------------------------
def test_paper_recipe_runs_through_the_cli_on_generated_data(tmp_path, shared_cache):
    output = tmp_path / "out"
    args = [
        "--recipe", RECIPE, "--dataset-config", DATASET,
        "--shots", "2", "--seeds", "1", "OPTIM.MAX_ITERS", "4", "OUTPUT_DIR", str(output),
        "CACHE_DIR", str(shared_cache), "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
        "TRAINER.CAMVLA.ATTENTION_MAPS", "2",
    ]  # fmt: skip
    results = run_command(args, output)
    assert results["status"] == "complete"
    assert results["config"]["TRAINER"]["CAMVLA"]["LOSS"] == "source"
    assert 0.0 <= results["metrics"]["test"]["accuracy"] <= 1.0
    run_dir = Path(results["run_dir"])
    assert (run_dir / "checkpoint.safetensors").is_file()
    assert len(list((run_dir / "attention_maps").glob("*.png"))) == 2


def test_lora_variant_runs_end_to_end(fast_opts):
    results = execute_run(build_config(VARIANT, DATASET, fast_opts))
    assert results["status"] == "complete", results.get("traceback")
    assert 0.0 <= results["metrics"]["test"]["accuracy"] <= 1.0


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL_DATA / "herlev").is_dir(),
    reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run this",
)
def test_paper_recipe_on_herlev(tmp_path):
    opts = ["DATASET.ROOT", str(REAL_DATA / "herlev"), "DATASET.HERLEV.VIEW", "bethesda"]
    opts += ["OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR", str(tmp_path / "cache")]
    opts += ["MODEL.NAME", "tiny-vit", "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "3"]
    opts += ["TRAINER.CAMVLA.ATTENTION_MAPS", "1"]
    results = execute_run(build_config(RECIPE, "configs/datasets/herlev.yaml", opts))
    assert results["status"] == "complete", results.get("traceback")
    test = results["metrics"]["test"]
    assert 150 < test["num_samples"] < 350 and 0.0 <= test["balanced_accuracy"] <= 1.0
    assert len(list((Path(results["run_dir"]) / "attention_maps").glob("*.png"))) == 1
