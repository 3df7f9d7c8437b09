"""LoRA selection, scaling, freezing, adapter files and merging on the tiny CLIP; the CLIP-LoRA
paper recipe (one template, fixed logit scale, bicubic crops) and its runs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

from fewclip.attention import split_attention
from fewclip.augment import augment_batch
from fewclip.backbones import build_clip
from fewclip.config import ConfigError, build_config, get_cfg_defaults
from fewclip.lora import (
    LoRALinear,
    apply_lora,
    compute_lora_scaling,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    select_lora_modules,
)
from fewclip.prompts import build_default_prompts
from fewclip.run import execute_run
from fewclip_trainers.clip_lora import CLIPLoRA, build_class_texts

RECIPE, SYNTHETIC = "configs/trainers/clip_lora.yaml", "configs/datasets/synthetic.yaml"
REAL_DATA = Path(os.environ.get("FEWCLIP_REAL_DATA", "/nonexistent/fewclip-real-data"))

IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
TEXTS = ["a histopathology image of tumor.", "normal cervix"]


def lora_cfg(**values):
    cfg = get_cfg_defaults().LORA
    for key, value in values.items():
        cfg[key] = value
    return cfg


def tiny():
    return build_clip(get_cfg_defaults().MODEL)


def encode(bundle):
    with torch.no_grad():
        return bundle.model.encode_image(IMAGES), bundle.model.encode_text(bundle.tokenizer(TEXTS))


def max_difference(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def randomise_lora_b(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_injected_model_starts_identical_and_trains_only_selected_lora():
    bundle = tiny()
    before = encode(bundle)
    config = lora_cfg(ENCODER="vision", LAYERS=[1], TARGETS=["q", "mlp"], RANK=4)
    names = apply_lora(bundle.model, config)
    block = "visual.transformer.resblocks.1"
    expected = {
        f"{block}.{module}.lora_{side}.default.weight"
        for module in ("attn.q_proj", "mlp.c_fc", "mlp.c_proj")
        for side in "AB"
    }
    assert set(names) == expected
    trainable = {name for name, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert bundle.model.get_submodule(f"{block}.attn.q_proj").lora_A["default"].weight.shape == (
        4,
        64,
    )
    assert max_difference(before, encode(bundle)) == 0.0


def test_top_k_and_both_encoders_with_text_rank():
    bundle = tiny()
    names = apply_lora(bundle.model, lora_cfg(ENCODER="both", TOP_K=1, TARGETS=["v"], TEXT_RANK=3))
    assert sorted(names) == sorted(
        f"{prefix}.1.attn.v_proj.lora_{side}.default.weight"
        for prefix in ("visual.transformer.resblocks", "transformer.resblocks")
        for side in "AB"
    )
    shapes = {name: tuple(p.shape) for name, p in bundle.model.named_parameters() if name in names}
    assert shapes["visual.transformer.resblocks.1.attn.v_proj.lora_A.default.weight"] == (2, 64)
    assert shapes["transformer.resblocks.1.attn.v_proj.lora_A.default.weight"] == (3, 64)


def test_vision_lora_leaves_text_encoder_untouched():
    bundle = tiny()
    before = encode(bundle)
    names = apply_lora(
        bundle.model, lora_cfg(ENCODER="vision", TARGETS=["q", "k", "v", "out", "mlp"])
    )
    assert len(names) == 2 * 2 * 6 and all(name.startswith("visual.") for name in names)
    assert not any(isinstance(module, LoRALinear) for module in bundle.model.transformer.modules())
    randomise_lora_b(bundle.model)
    image_features, text_features = encode(bundle)
    assert torch.equal(text_features, before[1])
    assert (image_features - before[0]).abs().max() > 1e-3


def test_adapter_round_trip_into_fresh_models(tmp_path):
    config = lora_cfg(ENCODER="both", LAYERS=[0], TARGETS=["q", "out"], RANK=2, TEXT_RANK=4)
    bundle = tiny()
    apply_lora(bundle.model, config)
    randomise_lora_b(bundle.model)
    expected = encode(bundle)
    path = tmp_path / "adapter" / "lora.safetensors"
    save_adapter(bundle.model, path)
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(lora_state_dict(bundle.model))
        saved_config = json.loads(handle.metadata()["fewclip_lora_config"])
    assert saved_config["ENCODER"] == "both" and saved_config["TEXT_RANK"] == 4
    assert saved_config["SCALING"] == "alpha_over_r"

    configured = tiny()  # LoRA injected by the caller, then loaded
    apply_lora(configured.model, config)
    load_adapter(configured.model, path)
    assert max_difference(expected, encode(configured)) == 0.0

    bare = tiny()  # no LoRA yet: injected from the file's metadata
    load_adapter(bare.model, path)
    assert max_difference(expected, encode(bare)) == 0.0

    other = tiny()
    apply_lora(other.model, lora_cfg(ENCODER="vision", LAYERS=[1]))
    with pytest.raises(ValueError, match="missing .*resblocks.1"):
        load_adapter(other.model, path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_adapter(other.model, tmp_path / "absent.safetensors")


def test_merge_folds_deltas_into_plain_linears():
    bundle = tiny()
    apply_lora(
        bundle.model, lora_cfg(ENCODER="both", TARGETS=["q", "k", "v", "out", "mlp"], ALPHA=4.0)
    )
    randomise_lora_b(bundle.model)
    with_lora = encode(bundle)
    assert max_difference(with_lora, encode(tiny())) > 1e-3
    merge_lora(bundle.model)
    assert not any(isinstance(module, LoRALinear) for module in bundle.model.modules())
    assert set(bundle.model.state_dict()) == set(tiny().model.state_dict())
    assert type(bundle.model.visual.transformer.resblocks[0].attn.q_proj) is torch.nn.Linear
    assert max_difference(with_lora, encode(bundle)) < 1e-5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ENCODER": "audio"}, "ENCODER 'audio'.*vision, text, both"),
        ({"TARGETS": ["q", "qkv"]}, "qkv.*q, k, v, out, mlp"),
        ({"LAYERS": [0, 2]}, r"LAYERS \[2\] out of range .*0\.\.1"),
        ({"TOP_K": 3}, "TOP_K 3 exceeds"),
        ({"RANK": 0}, "RANK must be >= 1"),
        (
            {"SCALING": "alpha_over_rank"},
            "LORA.SCALING 'alpha_over_rank'.*alpha_over_r, alpha_over_sqrt_r",
        ),
    ],
)
def test_bad_lora_config_values_raise(values, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny().model, lora_cfg(**values))


# ----- scaling: W x + s B A x, s = alpha / sqrt(r) (CLIP-LoRA loralib/layers.py:42, :204) -------
def hand_made(shape, offset):
    """Deterministic, non-symmetric values (no RNG): a ramp through a sine."""
    count = math.prod(shape)
    return torch.sin(torch.arange(count, dtype=torch.float32) * 0.37 + offset).view(shape) * 0.3


def set_hand_made_lora(layer, offset):
    """Give one LoRA Linear hand-made A (r, in) and B (out, r); return (W, b, A, B)."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(hand_made(a.shape, offset))
        b.copy_(hand_made(b.shape, offset + 1.0))
    base = layer.base_layer
    return base.weight.detach(), base.bias.detach(), a.detach().clone(), b.detach().clone()


def reference_attention(x, weights, heads):
    """Independent multi-head self-attention from merged (W, b) of q, k, v, out; x (N, L, E)."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = weights
    batch, length, width = x.shape
    head_dim = width // heads

    def split(t):  # (N, L, E) -> (N, heads, L, head_dim)
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = split(x @ wq.T + bq), split(x @ wk.T + bk), split(x @ wv.T + bv)
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (attention @ v).transpose(1, 2).reshape(batch, length, width)
    return out @ wo.T + bo


@pytest.mark.parametrize(
    ("scaling", "factor"),
    [("alpha_over_sqrt_r", lambda a, r: a / math.sqrt(r)), ("alpha_over_r", lambda a, r: a / r)],
)
def test_lora_output_is_w_x_plus_scaled_b_a_x(scaling, factor):
    alpha, rank, text_rank = 3.0, 4, 2
    bundle = tiny()
    config = lora_cfg(
        ENCODER="both", LAYERS=[0], TARGETS=["q", "k", "v", "out", "mlp"], RANK=rank,
        TEXT_RANK=text_rank, ALPHA=alpha, SCALING=scaling,
    )  # fmt: skip
    apply_lora(bundle.model, config)
    bundle.model.eval()  # LoRA dropout off
    assert compute_lora_scaling(alpha, rank, scaling) == pytest.approx(factor(alpha, rank))
    offset = 0.0
    for prefix, r in (
        ("visual.transformer.resblocks.0", rank),
        ("transformer.resblocks.0", text_rank),
    ):
        s = factor(alpha, r)
        block = bundle.model.get_submodule(prefix)
        merged = []
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc"):
            layer = block.get_submodule(name)
            offset += 2.0
            w, b, a, b_up = set_hand_made_lora(layer, offset)
            assert a.shape[0] == r
            x = hand_made((5, w.shape[1]), offset + 0.5)
            expected = x @ w.T + b + s * (x @ a.T) @ b_up.T
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
            merged.append((w + s * b_up @ a, b))
        attention = block.attn  # the split q/k/v/out attention as the block calls it
        assert attention.batch_first  # open_clip's blocks call it with (N, L, E)
        x = hand_made((2, 6, attention.embed_dim), 9.0)
        output, _ = attention(x, x, x, need_weights=False)
        expected = reference_attention(x, merged[:4], attention.num_heads)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


def test_old_adapter_without_scaling_loads_as_alpha_over_r(tmp_path):
    bundle = tiny()
    config = lora_cfg(LAYERS=[0], TARGETS=["q"], RANK=4, ALPHA=2.0, SCALING="alpha_over_r")
    apply_lora(bundle.model, config)
    randomise_lora_b(bundle.model)
    expected = encode(bundle)
    metadata = dict(bundle.model.fewclip_lora_config)
    del metadata["SCALING"]  # written before the key existed
    state = {name: tensor.contiguous() for name, tensor in lora_state_dict(bundle.model).items()}
    save_file(
        state, str(tmp_path / "old.safetensors"), {"fewclip_lora_config": json.dumps(metadata)}
    )
    fresh = tiny()
    load_adapter(fresh.model, tmp_path / "old.safetensors")
    assert max_difference(expected, encode(fresh)) == 0.0


# ----- fewclip's LoRA layer against peft 0.21, the library it replaced --------------------------
def inject_with_peft(model, config):
    """LoRA through peft, as fewclip.lora did before it had its own layer: the same selection,
    given to peft as one anchored regex, the text rank as a rank pattern."""
    split_attention(model)
    selected = select_lora_modules(model, config)
    names = [name for encoder_names in selected.values() for name in encoder_names]
    text_rank = config.TEXT_RANK or config.RANK
    peft_config = LoraConfig(
        r=config.RANK, lora_alpha=config.ALPHA, lora_dropout=config.DROPOUT,
        target_modules="|".join(re.escape(name) for name in names),
        rank_pattern={"^" + re.escape(name): text_rank for name in selected.get("text", [])},
        bias="none", use_rslora=config.SCALING == "alpha_over_sqrt_r",
    )  # fmt: skip
    inject_adapter_in_model(peft_config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)


def merge_with_peft(model):
    from peft.tuners.lora import LoraLayer

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        module.merge()
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, module.get_base_layer())


def lora_twins(build, config, seed=11):
    """The same model built twice from one seed, LoRA injected by fewclip and by peft."""
    torch.manual_seed(seed)
    ours = build()
    apply_lora(ours.model, config)
    torch.manual_seed(seed)
    reference = build()
    inject_with_peft(reference.model, config)
    return ours, reference


def assert_same_state(first, second):
    one, two = first.state_dict(), second.state_dict()
    assert list(one) == list(two)  # the same names in the same order: files and optimisers agree
    different = [name for name in one if not torch.equal(one[name], two[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_training_step(ours, reference, images, tokens):
    """Dropout on, the same random stream: outputs and every LoRA gradient bit for bit."""
    outputs = []
    for model in (ours, reference):
        model.train()
        torch.manual_seed(5)
        image, text = model.encode_image(images), model.encode_text(tokens)
        (image.square().sum() + (image @ text.T).sum()).backward()
        outputs.append((image.detach(), text.detach()))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    grads = dict(reference.named_parameters())
    checked = 0
    for name, parameter in ours.named_parameters():
        assert parameter.requires_grad == grads[name].requires_grad, name
        if parameter.requires_grad:
            assert torch.equal(parameter.grad, grads[name].grad), name
            checked += 1
    assert checked == len(lora_state_dict(ours))


LORA_CASES = {
    "both encoders, every target, text rank, dropout, rsLoRA": dict(
        ENCODER="both", TARGETS=["q", "k", "v", "out", "mlp"], RANK=4, TEXT_RANK=3,
        ALPHA=2.0, DROPOUT=0.25, SCALING="alpha_over_sqrt_r",
    ),
    "vision top block, v before q, alpha / r": dict(
        ENCODER="vision", TOP_K=1, TARGETS=["v", "q"], RANK=2, ALPHA=4.0, DROPOUT=0.0
    ),
    "text layer 0, out and mlp": dict(ENCODER="text", LAYERS=[0], TARGETS=["out", "mlp"]),
}  # fmt: skip


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_equals_peft_draw_for_draw_in_training_under_autocast_and_merged(case):
    config = lora_cfg(**LORA_CASES[case])
    ours, reference = lora_twins(tiny, config)
    assert_same_state(ours.model, reference.model)  # same names, same random A, zero B
    for model in (ours.model, reference.model):
        randomise_lora_b(model)  # non-zero deltas from here on
    tokens = ours.tokenizer(TEXTS)
    assert_same_training_step(ours.model, reference.model, IMAGES, tokens)
    for model in (ours.model, reference.model):
        model.eval()
    models = (ours.model, reference.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = [(model.encode_image(IMAGES), model.encode_text(tokens)) for model in models]
    assert low[0][0].dtype == torch.bfloat16
    assert torch.equal(low[0][0], low[1][0]) and torch.equal(low[0][1], low[1][1])
    merge_lora(ours.model)
    merge_with_peft(reference.model)
    assert_same_state(ours.model, reference.model)


def test_adapter_written_through_peft_loads_and_gives_the_same_features(tmp_path):
    config = lora_cfg(**LORA_CASES["both encoders, every target, text rank, dropout, rsLoRA"])
    _, reference = lora_twins(tiny, config)
    randomise_lora_b(reference.model)
    reference.model.eval()
    expected = encode(reference)
    save_adapter(reference.model, tmp_path / "peft.safetensors")  # peft's names, as before
    fresh = tiny()
    apply_lora(fresh.model, config)
    load_adapter(fresh.model, tmp_path / "peft.safetensors")
    assert max_difference(expected, encode(fresh)) == 0.0


def test_lora_layer_reads_as_its_base_linear_and_prints_rank_and_scale():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, scaling=0.5, dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A["default"].weight.shape == (2, 6)
    assert not layer.lora_B["default"].weight.any()
    assert "rank=2, scaling=0.5" in repr(layer)
    half = LoRALinear(torch.nn.Linear(6, 5).to(torch.bfloat16), rank=2, scaling=1.0, dropout=0.0)
    assert half.lora_A["default"].weight.dtype == torch.bfloat16  # the base layer's dtype, as peft
    with torch.no_grad():
        half.lora_B["default"].weight.fill_(0.25)
    a, b = half.lora_A["default"].weight.float(), half.lora_B["default"].weight.float()
    assert half.delta_weight().dtype == torch.bfloat16
    assert torch.equal(half.delta_weight(), (b @ a).to(torch.bfloat16))  # fp32 sum, then cast


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("LORA.SCALING", "sqrt", "alpha_over_r, alpha_over_sqrt_r"),
        ("INPUT.CROP_INTERPOLATION", "nearest", "bilinear, bicubic"),
    ],
)
def test_bad_choice_fails_at_config_time_naming_key_and_choices(key, value, choices):
    with pytest.raises(ConfigError) as error:
        build_config(RECIPE, SYNTHETIC, [key, value])
    message = str(error.value)
    assert key in message and repr(value) in message and choices in message and "\n" not in message


# ----- the CLIP-LoRA trainer: source template, logit scale, crops ------------------------------
def clip_lora(*opts: str) -> CLIPLoRA:
    cfg = build_config(RECIPE, SYNTHETIC, ["MODEL.NAME", "tiny-vit", "CACHE_DIR", "", *opts])
    names = ["normal", "high_grade", "carcinoma_in_situ"]
    prompts = build_default_prompts(names, ["an image of {}."])
    prompts.classes["high_grade"]["label"] = "a high-grade lesion"
    dataset = SimpleNamespace(class_names=names, prompts=prompts)
    return CLIPLoRA(cfg, build_clip(cfg.MODEL), dataset, torch.device("cpu"))


def test_recipe_is_the_released_code():
    cfg = build_config(RECIPE, SYNTHETIC)
    lora, node = cfg.LORA, cfg.TRAINER.CLIPLORA
    assert (lora.ENCODER, list(lora.TARGETS), lora.RANK, lora.ALPHA) == (
        "both",
        ["q", "k", "v"],
        2,
        1.0,
    )
    assert (lora.SCALING, lora.DROPOUT, list(lora.LAYERS), lora.TOP_K) == (
        "alpha_over_sqrt_r",
        0.25,
        [],
        0,
    )
    assert compute_lora_scaling(lora.ALPHA, lora.RANK, lora.SCALING) == pytest.approx(0.70710678)
    assert (list(node.TEMPLATES), node.CLASS_WORDS, node.LOGIT_SCALE) == (
        ["a photo of a {}."],
        "class_name",
        100.0,
    )
    assert tuple(cfg.INPUT.CROP_SCALE) == (0.08, 1.0) and cfg.INPUT.CROP_INTERPOLATION == "bicubic"
    optim = cfg.OPTIM
    assert (optim.LR, optim.WEIGHT_DECAY, optim.MIN_LR, optim.BATCH_SIZE) == (2e-4, 1e-2, 1e-6, 32)
    assert (optim.ITERS_PER_SHOT, optim.WARMUP_ITERS, cfg.EVAL.SELECT) == (500, 0, "last")


def test_class_texts_are_one_template_with_the_class_name():
    trainer = clip_lora()
    assert trainer.class_texts() == [
        ["a photo of a normal."],
        ["a photo of a high grade."],
        ["a photo of a carcinoma in situ."],
    ]
    labels = clip_lora("TRAINER.CLIPLORA.CLASS_WORDS", "label").class_texts()
    assert labels[1] == ["a photo of a a high-grade lesion."]
    ensemble = clip_lora("TRAINER.CLIPLORA.TEMPLATES", "[]").class_texts()
    assert ensemble == trainer.prompts.texts("label")
    assert build_class_texts(["a_b"], ["x"], ["{}.", "A {}!"], "class_name") == [["a b.", "A a b!"]]
    with pytest.raises(ValueError, match="CLASS_WORDS 'word'.*class_name, label"):
        clip_lora("TRAINER.CLIPLORA.CLASS_WORDS", "word")
    with pytest.raises(ValueError, match="TEMPLATES \\[\\]"):
        clip_lora("TRAINER.CLIPLORA.PROMPT_LEVEL", "short")


def test_logits_are_a_fixed_100_times_the_cosine():
    trainer = clip_lora()
    trainer.prepare(SimpleNamespace())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trainer.network.eval()
    with torch.no_grad():
        trainer.on_eval_start()
        logits = trainer.compute_logits(images)
        image = torch.nn.functional.normalize(trainer.clip.encode_image(images), dim=-1)
        from fewclip.features import compute_text_features

        text = compute_text_features(
            trainer.clip, trainer.bundle.tokenizer, trainer.class_texts(), "cpu"
        )
    torch.testing.assert_close(logits, 100.0 * image @ text.T, rtol=1e-5, atol=1e-4)
    learned = clip_lora("TRAINER.CLIPLORA.LOGIT_SCALE", "0")
    assert learned.logit_scale() == pytest.approx(float(learned.clip.logit_scale.exp()))


def test_training_crops_are_the_recipe_scale_and_bicubic():
    trainer = clip_lora()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    state = trainer.generator.get_state()
    cropped = trainer.augment(images, None)
    size = trainer.bundle.image_size  # crops are sampled at the model input
    expected = augment_batch(
        images, torch.Generator().set_state(state), (0.08, 1.0), size, "bicubic"
    )
    torch.testing.assert_close(cropped, expected)
    bilinear = augment_batch(images, torch.Generator().set_state(state), (0.08, 1.0), size)
    assert (bilinear - cropped).abs().max() > 1e-3
    with pytest.raises(ValueError, match="INPUT.CROP_INTERPOLATION 'area'.*bilinear, bicubic"):
        augment_batch(images, torch.Generator(), interpolation="area")


def test_paper_recipe_runs_end_to_end(fast_opts):
    results = execute_run(build_config(RECIPE, SYNTHETIC, fast_opts))
    assert results["status"] == "complete", results.get("error")
    assert results["config"]["LORA"]["SCALING"] == "alpha_over_sqrt_r"


@pytest.mark.real_data
@pytest.mark.skipif(
    not (REAL_DATA / "herlev").is_dir(),
    reason="set FEWCLIP_REAL_DATA to the shared real-data folder to run this",
)
def test_paper_recipe_on_herlev(tmp_path):
    opts = ["DATASET.ROOT", str(REAL_DATA / "herlev"), "OUTPUT_DIR", str(tmp_path / "out")]
    opts += ["CACHE_DIR", str(tmp_path / "cache"), "MODEL.NAME", "tiny-vit"]
    opts += ["DATASET.NUM_SHOTS", "2", "OPTIM.MAX_ITERS", "3", "OPTIM.BATCH_SIZE", "8"]
    results = execute_run(build_config(RECIPE, "configs/datasets/herlev.yaml", opts))
    assert results["status"] == "complete", results.get("error")
    assert results["split"]["num_train"] == 7 * 2
    assert 0.0 <= results["metrics"]["test"]["balanced_accuracy"] <= 1.0
