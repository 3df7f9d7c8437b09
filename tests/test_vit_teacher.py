"""ViTTeacher: heads, trainable sets per mode, local weights (timm and open_clip towers), label
efficiency (DATASET.TRAIN_FRACTION), the CervixFM fixed-feature probe, end-to-end runs with
retrieval metrics (the paper recipe configs/trainers/cervixfm_probe.yaml)."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewclip.backbones import build_clip
from fewclip.config import build_config
from fewclip.hooks import EarlyStopHook, FitContext, LearningRateHook
from fewclip.registry import DATASETS
from fewclip.run import execute_run
from fewclip.splits import SplitError, build_split, draw_split, split_file_path
from fewclip.trainer import ImageSet
from fewclip_trainers.vit_teacher import (
    ViTTeacher,
    build_head,
    build_timm_encoder,
    load_encoder_weights,
)

RECIPE, DATA = "configs/trainers/vit_teacher.yaml", "configs/datasets/synthetic.yaml"
PROBE = "configs/trainers/cervixfm_probe.yaml"
REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))
CLASSES = ["normal", "lsil", "hsil", "carcinoma"]


def build_trainer(*opts: str, recipe: str = RECIPE) -> ViTTeacher:
    cfg = build_config(recipe, DATA, list(opts))
    dataset = SimpleNamespace(class_names=CLASSES, prompts=None)
    return ViTTeacher(cfg, build_clip(cfg.MODEL), dataset, torch.device("cpu"))


def test_heads_and_zero_initialisation():
    linear = build_head("linear", 8, 3, 16, 0.0, zero_init=True)
    assert torch.equal(linear(torch.randn(2, 8)), torch.zeros(2, 3))
    mlp = build_head("mlp", 8, 3, 16, 0.1, zero_init=False)
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [16, 3]
    with pytest.raises(ValueError, match="HEAD"):
        build_head("conv", 8, 3, 16, 0.0, False)


def test_finetune_trains_encoder_and_head_without_the_text_tower():
    trainer = build_trainer()
    names = {name for name, _ in trainer.trainable_named_parameters()}
    encoder = {f"encoder.{n}" for n, _ in trainer.network["encoder"].named_parameters()}
    head = {f"head.{n}" for n, _ in trainer.network["head"].named_parameters()}
    assert names == encoder | head
    assert "clip" not in trainer.network
    assert trainer.compute_logits(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_linear_probe_trains_a_zero_initialised_head_only():
    trainer = build_trainer(
        "TRAINER.VITTEACHER.MODE", "linear_probe", "TRAINER.VITTEACHER.HEAD", "linear"
    )
    names = {name for name, _ in trainer.trainable_named_parameters()}
    assert names == {"head.0.weight", "head.0.bias"}
    assert torch.equal(trainer.compute_logits(torch.randn(2, 3, 64, 64)), torch.zeros(2, 4))


def test_timm_encoder_loads_wrapped_local_weights_and_resizes_inputs(tmp_path):
    encoder, dim, mean, std = build_timm_encoder("vit_tiny_patch16_224", 32)
    assert dim == 192 and len(mean) == len(std) == 3
    state = {f"module.{k}": v + 1.0 for k, v in encoder.state_dict().items()}
    state["module.head.weight"] = torch.zeros(5, 192)  # a classifier head is ignored
    torch.save({"state_dict": state}, tmp_path / "uni_like.pth")
    load_encoder_weights(encoder, tmp_path / "uni_like.pth")
    torch.testing.assert_close(encoder.state_dict()["cls_token"], state["module.cls_token"])
    trainer = build_trainer(
        "TRAINER.VITTEACHER.ARCH", "vit_tiny_patch16_224", "TRAINER.VITTEACHER.IMAGE_SIZE", "32",
        "TRAINER.VITTEACHER.WEIGHTS", str(tmp_path / "uni_like.pth"),
    )  # fmt: skip
    assert trainer.input_size == 32 and trainer.mean == tuple(mean)
    assert trainer.compute_logits(torch.randn(2, 3, 64, 64)).shape == (2, 4)  # resized 64 -> 32


def test_lora_mode_adapts_a_timm_teachers_split_attention_and_trains_only_lora_and_head(tmp_path):
    """MODE lora on an image-only timm ViT (UNI / CervixFM style): the fused qkv is split exactly
    (equal to the original before training), LoRA goes on q, k, v and proj per LORA.TARGETS,
    and only the LoRA tensors and the head train; the merged encoder equals the unmerged."""
    from fewclip.lora import merge_lora

    original, *_ = build_timm_encoder("vit_tiny_patch16_224", 32)
    torch.save(original.state_dict(), tmp_path / "teacher.pt")
    trainer = build_trainer(
        "TRAINER.VITTEACHER.ARCH", "vit_tiny_patch16_224", "TRAINER.VITTEACHER.IMAGE_SIZE", "32",
        "TRAINER.VITTEACHER.WEIGHTS", str(tmp_path / "teacher.pt"),
        "TRAINER.VITTEACHER.MODE", "lora", "LORA.TARGETS", "q,v,out", "LORA.RANK", "2",
    )  # fmt: skip
    encoder = trainer.network["encoder"]
    images = torch.randn(2, 3, 32, 32)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), original.eval()(images), atol=1e-5, rtol=0)
    names = {name for name, _ in trainer.trainable_named_parameters()}
    adapted = {name.split(".lora_")[0] for name in names if ".lora_" in name}
    assert adapted == {f"encoder.blocks.{i}.attn.{m}" for i in range(12) for m in TARGETS}
    head = {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}  # the MLP head
    assert {name for name in names if ".lora_" not in name} == head
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.1)
        unmerged = encoder(images)
        merge_lora(encoder)
        torch.testing.assert_close(encoder(images), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="MODE lora adapts the image encoder only"):
        build_trainer("TRAINER.VITTEACHER.MODE", "lora", "LORA.ENCODER", "text")


TARGETS = ("q_proj", "v_proj", "proj")


def test_weight_mismatch_is_one_error_naming_file_and_keys(tmp_path):
    encoder, *_ = build_timm_encoder("vit_tiny_patch16_224", 32)
    state = encoder.state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as error:
        load_encoder_weights(encoder, tmp_path / "bad.pt")
    message = str(error.value)
    assert "bad.pt" in message and "missing (1): blocks.0.attn.qkv.weight" in message
    assert "unexpected (1): blocks.0.attn.qkv_renamed.weight" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="WEIGHTS"):
        load_encoder_weights(encoder, tmp_path / "absent.pt")


def test_open_clip_tower_takes_the_visual_part_of_a_clip_checkpoint(tmp_path):
    cfg = build_config(RECIPE, DATA)
    source = build_clip(cfg.MODEL).model
    with torch.no_grad():
        for parameter in source.visual.parameters():
            parameter.add_(0.5)
    torch.save(source.state_dict(), tmp_path / "clip.pt")  # text tower keys included
    trainer = build_trainer("TRAINER.VITTEACHER.WEIGHTS", str(tmp_path / "clip.pt"))
    for name, value in source.visual.state_dict().items():
        torch.testing.assert_close(trainer.network["encoder"].state_dict()[name], value)


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_train_fraction_takes_a_seeded_nested_share_of_each_class(make_cfg, rounding):
    def split_for(fraction: float, seed: int = 1):
        cfg = make_cfg(SOURCE_CENTERS=["center_a"], TRAIN_FRACTION=fraction, SPLIT_SEED=seed)
        cfg.DATASET.TRAIN_FRACTION_ROUNDING = rounding
        cfg.DATASET.SYNTHETIC.IMAGES_PER_CLASS = 12
        dataset = DATASETS.get("SyntheticMultiCenter")(cfg)
        return cfg, dataset, draw_split(dataset, cfg)

    cfg, dataset, (pool_half, *_rest) = split_for(0.5)
    _, _, (pool_all, *_) = split_for(1.0)
    _, _, (quarter, *_) = split_for(0.25)
    per_class_all = Counter(item.class_name for item in pool_all)
    per_class_half = Counter(item.class_name for item in pool_half)
    round_count = int if rounding == "floor" else math.ceil
    assert per_class_half == {name: round_count(0.5 * n) for name, n in per_class_all.items()}
    assert set(quarter) <= set(pool_half) <= set(pool_all)  # nested across fractions
    assert split_for(0.5)[2][0] == pool_half  # seeded
    assert split_for(0.5, seed=2)[2][0] != pool_half
    default_name = split_file_path(dataset, make_cfg(SOURCE_CENTERS=["center_a"])).name
    assert split_file_path(dataset, cfg).name != default_name
    assert len(build_split(dataset, cfg).train) == len(pool_half)
    with pytest.raises(SplitError, match="TRAIN_FRACTION"):
        split_for(1.5)


# ----- the CervixFM probe: fixed features (downstream/utils/train.py:99-140) ---------------------
def tiny_train_set(count: int = 6) -> ImageSet:
    pixels = np.random.default_rng(0).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    return ImageSet(images=pixels, labels=np.arange(count) % 4, centers=["a"] * count)


def head_inputs_per_step(trainer: ViTTeacher, train: ImageSet) -> list[torch.Tensor]:
    """Train, recording the (B, D) features each step feeds the head, rows put in index order."""
    seen, batches = [], []
    original = trainer.build_sampler

    def recording_sampler(data):
        sampler = original(data)
        epoch = sampler.epoch_indices

        def indices():
            order = epoch()
            batches.append(order)
            return order

        sampler.epoch_indices = indices
        return sampler

    trainer.build_sampler = recording_sampler
    hook = trainer.network["head"].register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].detach().clone())
    )
    trainer.fit(train, None)
    hook.remove()
    return [features[np.argsort(order)] for features, order in zip(seen, batches)]


def test_probe_without_augmentation_sees_identical_features_each_epoch(fast_opts):
    trainer = build_trainer(*fast_opts, "OPTIM.MAX_ITERS", "4", recipe=PROBE)
    assert trainer.fixed_features and trainer.cfg.INPUT.AUGMENT == "none"
    train = tiny_train_set()
    steps = head_inputs_per_step(trainer, train)
    assert len(steps) == 4  # batch = the whole set: one step per epoch, as the source's 1 batch
    encoder = trainer.network["encoder"].eval()
    with torch.no_grad():  # independent: the frozen encoder on the un-augmented images
        expected = encoder(trainer.input_tensor(train.images))
    for features in steps:
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    cropped = build_trainer(
        *fast_opts, "OPTIM.MAX_ITERS", "4", "TRAINER.VITTEACHER.PROBE_AUGMENT", "crop_flip",
        "INPUT.AUGMENT", "crop_flip", recipe=PROBE,
    )  # fmt: skip
    varied = head_inputs_per_step(cropped, tiny_train_set())
    assert (varied[0] - varied[1]).abs().max() > 1e-4  # new crops, new features every epoch


def test_probe_recipe_is_the_released_code():
    cfg = build_config(PROBE, DATA)
    node, optim = cfg.TRAINER.VITTEACHER, cfg.OPTIM
    assert (node.MODE, node.HEAD, node.PROBE_AUGMENT, node.EPOCHS) == (
        "linear_probe", "linear", "none", 1000,
    )  # fmt: skip
    assert (optim.LR, optim.WEIGHT_DECAY, optim.MIN_LR, optim.BATCH_SIZE) == (1e-3, 1e-4, 1e-6, 64)
    assert cfg.DATASET.TRAIN_FRACTION_ROUNDING == "floor" and list(cfg.EVAL.RETRIEVAL) == [
        1,
        3,
        5,
        10,
    ]
    assert cfg.EVAL.RETRIEVAL_NORMALISE == "centre_then_normalise"
    # CDetector_train.py:66 T_max, :58 AdamW over the whole head, train.py:86 patience 100
    assert node.SOURCE_T_MAX and optim.DECAY_ALL and optim.EARLY_STOP_EPOCHS == 100


def test_source_t_max_gives_torchs_cosine_past_its_minimum(fast_opts):
    """SOURCE_T_MAX: T_max = EPOCHS x N // BATCH_SIZE (10 images, 20 epochs, batch 64: 3) while
    the run takes 20 steps; the lr of every step equals torch's CosineAnnealingLR stepped after
    each optimiser step, which passes 1e-6 at step 3 and rises again."""
    opts = [*fast_opts, "OPTIM.MAX_ITERS", "0", "OPTIM.BATCH_SIZE", "64"]
    trainer = build_trainer(*opts, "TRAINER.VITTEACHER.EPOCHS", "20", recipe=PROBE)
    trainer.prepare(tiny_train_set(10))
    total = trainer.num_iterations()
    assert (total, trainer.num_cosine_iterations(total, 0)) == (20, 3)
    group = {"lr": 0.0}
    ctx = SimpleNamespace(
        trainer=trainer, total=total, optimizer=SimpleNamespace(param_groups=[group])
    )
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference_optimizer, 3, eta_min=1e-6)
    ours, torchs = [], []
    for step in range(total):
        ctx.step = step
        LearningRateHook().before_step(ctx)
        ours.append(group["lr"])
        torchs.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        scheduler.step()
    assert ours == pytest.approx(torchs, rel=1e-9, abs=1e-15)
    assert ours[3] == pytest.approx(1e-6) and ours[6] == pytest.approx(1e-3)  # up again
    source_off = ["TRAINER.VITTEACHER.SOURCE_T_MAX", "False"]
    plain = build_trainer(*opts, "TRAINER.VITTEACHER.EPOCHS", "20", *source_off, recipe=PROBE)
    plain.prepare(tiny_train_set(10))
    assert plain.num_cosine_iterations(20, 0) == 20  # one half cosine over the run


def test_decay_all_puts_the_heads_bias_under_weight_decay(fast_opts):
    trainer = build_trainer(*fast_opts, recipe=PROBE)
    (group,) = trainer.build_optimizer(trainer.trainable_named_parameters()).param_groups
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == 2  # head weight and bias
    default = build_trainer(*fast_opts, "OPTIM.DECAY_ALL", "False", recipe=PROBE)
    groups = default.build_optimizer(default.trainable_named_parameters()).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 1e-4), (1, 0.0)]


def test_early_stop_ends_the_loop_after_patience_epochs_without_a_lower_mean_loss(
    fast_opts, monkeypatch
):
    """Scripted losses, one step per epoch (3 images, batch 3): best 0.9 at epoch 2, then two
    epochs that do not go below it -> the loop stops after step 4 of 30, validates there, and
    the report says so."""
    opts = [*fast_opts, "OPTIM.MAX_ITERS", "30", "OPTIM.EARLY_STOP_EPOCHS", "2"]
    trainer = build_trainer(*opts, recipe=PROBE)
    losses = iter([1.0, 0.9, 0.95, 0.9, 0.5, 0.4])

    def scripted(images, labels, indices):
        anchor = sum(p.sum() for _, p in trainer.trainable_named_parameters()) * 0.0
        return {"ce": anchor + next(losses)}

    monkeypatch.setattr(trainer, "compute_losses", scripted)
    scores = []
    report = trainer.fit(
        tiny_train_set(3), tiny_train_set(3), lambda t, data: scores.append(1) or 0.5
    )
    assert report["iterations"] == 4 and report["stopped_early"] is True
    assert report["final_loss"] == pytest.approx(0.9)
    assert [entry["step"] for entry in report["val_history"]] == [4] and scores == [1]


def test_early_stop_counts_epoch_means():
    """Two steps per epoch: the epoch means 1.0, 0.8, 0.85, 0.8 -> stops at the end of epoch 4
    (step 8) with patience 2; a strictly lower mean resets the count."""
    trainer = SimpleNamespace(cfg=SimpleNamespace(OPTIM=SimpleNamespace(EARLY_STOP_EPOCHS=2)))
    ctx = FitContext(trainer, None, None, None, None, None, [], total=100, epoch_steps=2)
    hook, stopped_at = EarlyStopHook(), None
    for step, loss in enumerate([1.0, 1.0, 0.7, 0.9, 0.8, 0.9, 0.9, 0.7, 0.1, 0.1]):
        ctx.step, ctx.global_loss = step, torch.tensor(loss)
        hook.after_step(ctx)
        if ctx.stop:
            stopped_at = step + 1
            break
    assert stopped_at == 8 and ctx.early_stop["best"] == pytest.approx(0.8)
    assert ctx.early_stop["stale"] == 2


def test_epochs_give_epochs_times_batches_per_epoch(fast_opts):
    trainer = build_trainer(
        *fast_opts, "OPTIM.MAX_ITERS", "0", "OPTIM.BATCH_SIZE", "4", recipe=PROBE
    )
    trainer.prepare(tiny_train_set(10))
    assert trainer.num_iterations() == 1000 * math.ceil(10 / 4)
    trainer.prepare(tiny_train_set(3))  # batch capped at the set: one step per epoch
    assert trainer.num_iterations() == 1000
    capped = build_trainer(*fast_opts, "OPTIM.MAX_ITERS", "7", recipe=PROBE)
    capped.prepare(tiny_train_set(10))
    assert capped.num_iterations() == 7


def test_bad_probe_options_name_key_and_choices():
    with pytest.raises(ValueError, match="PROBE_AUGMENT 'flip' is not one of none, crop_flip"):
        build_trainer("TRAINER.VITTEACHER.PROBE_AUGMENT", "flip", recipe=PROBE)
    with pytest.raises(ValueError, match="PROBE_AUGMENT crop_flip needs INPUT.AUGMENT crop_flip"):
        build_trainer("TRAINER.VITTEACHER.PROBE_AUGMENT", "crop_flip", recipe=PROBE)


def test_probe_recipe_runs_end_to_end_with_source_retrieval(fast_opts):
    results = execute_run(build_config(PROBE, DATA, fast_opts))
    assert results["status"] == "complete", results.get("error")
    retrieval = results["metrics"]["test"]["retrieval"]
    assert {"hit_rate@10", "majority_vote_accuracy@5", "majority_vote_accuracy@10"} <= set(
        retrieval
    )


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL_DATA / "herlev").is_dir(),
    reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run this",
)
def test_probe_recipe_on_herlev_with_label_efficiency(tmp_path):
    opts = ["DATASET.ROOT", str(REAL_DATA / "herlev"), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += ["CACHE_DIR", str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit"]
    opts += ["DATASET.TRAIN_FRACTION", "0.05", "OPTIM.MAX_ITERS", "3"]
    results = execute_run(build_config(PROBE, "configs/datasets/herlev.yaml", opts))
    assert results["status"] == "complete", results.get("error")
    assert results["metrics"]["test"]["retrieval"]["gallery_size"] == results["split"]["num_train"]
    assert 7 <= results["split"]["num_train"] < 917 * 0.05


def test_linear_probe_runs_end_to_end_with_retrieval(fast_opts):
    opts = [*fast_opts, "TRAINER.VITTEACHER.MODE", "linear_probe", "EVAL.RETRIEVAL", "[1, 3]"]
    results = execute_run(build_config(RECIPE, DATA, opts))
    assert results["status"] == "complete", results.get("error")
    retrieval = results["metrics"]["test"]["retrieval"]
    assert set(retrieval) >= {"hit_rate@1", "hit_rate@3", "majority_vote_accuracy@3"}
    assert retrieval["hit_rate@1"] <= retrieval["hit_rate@3"] <= 1.0
    assert retrieval["gallery_size"] == results["split"]["num_train"]
    assert "retrieval" in results["metrics"]["targets"]["center_b"]
