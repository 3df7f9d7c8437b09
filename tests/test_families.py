"""Model families through one interface, on tiny twins written to disk and loaded back the way a
user's model is (MODEL.NAME local-dir:..., no download): attention split exactly, LoRA on every
family's named Linears, token features, and every registered trainer's contract."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import assert_same_state, assert_same_training_step, lora_twins
from test_trainers import PACKAGE_TRAINERS, check_trainer_contract, recipe_for
from timm.layers import Attention
from yacs.config import CfgNode

from fewclip.attention import SplitAttentionPool, SplitQKVAttention
from fewclip.backbones import TINY_CONFIGS, build_clip
from fewclip.config import build_config, get_cfg_defaults
from fewclip.families import family_of, image_feature_dim
from fewclip.lora import apply_lora, merge_lora
from fewclip.registry import DATASETS, TRAINERS
from fewclip.run import build_image_set, load_clip
from fewclip.splits import build_split
from fewclip.tokens import encode_image_tokens, encode_text_tokens, patch_grid

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["timm_hf_twin", "hf_clip_twin", "resnet_twin"])
def twin(request) -> Path:
    return request.getfixturevalue(request.param)


def model_cfg(name: str) -> CfgNode:
    return CfgNode({"NAME": name, "PRETRAINED": "", "HF_HUB": ""})


def assert_merged_equals_unmerged(model, images: torch.Tensor) -> torch.Tensor:
    """Give every LoRA B random values, merge, and check the image features do not change;
    returns the unmerged features."""
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.1)
        unmerged = model.encode_image(images)
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), unmerged, atol=1e-5, rtol=0)
    return unmerged


def lora_cfg(**keys) -> CfgNode:
    node = get_cfg_defaults().LORA.clone()
    for key, value in keys.items():
        node[key] = value
    return node


def test_split_qkv_attention_equals_timm_fused_attention():
    torch.manual_seed(0)
    fused = Attention(48, num_heads=4, qkv_bias=True).eval()
    split = SplitQKVAttention(fused).eval()
    x = torch.randn(3, 11, 48)
    torch.testing.assert_close(split(x), fused(x), atol=1e-5, rtol=0)
    assert torch.equal(split.k_proj.weight, fused.qkv.weight[48:96])


def test_timm_hf_twin_loads_split_and_equal_to_the_fused_original(timm_hf_twin):
    bundle = build_clip(model_cfg(f"local-dir:{timm_hf_twin}"))
    original = open_clip.create_model(
        f"local-dir:{timm_hf_twin}", load_weights=False, pretrained_image=False,
        pretrained_text=False,
    ).eval()  # fmt: skip
    original.load_state_dict(load_file(str(timm_hf_twin / "open_clip_model.safetensors")))
    model = bundle.model
    assert not any(name.endswith(".qkv") for name, _ in model.named_modules())
    assert family_of(model).name == "timm-vit + hf-bert"
    images = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    text = bundle.tokenizer(["a photo of abnormal cells", "normal tissue"])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), original.encode_image(images), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(model.encode_text(text), original.encode_text(text))
    assert image_feature_dim(model) == 32 and bundle.image_size == 64
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_token_features_of_the_timm_hf_twin_pool_to_encode(timm_hf_twin):
    model = build_clip(model_cfg(f"local-dir:{timm_hf_twin}")).model
    images = torch.randn(2, 3, 64, 64)
    assert patch_grid(model) == (4, 4)
    with torch.no_grad():
        pooled, tokens = encode_image_tokens(model, images)
        torch.testing.assert_close(pooled, model.encode_image(images))
        assert tokens.shape == (2, 16, 64)
        text = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
        pooled_text, words, valid = encode_text_tokens(model, text)
        torch.testing.assert_close(pooled_text, model.encode_text(text))
    assert words.shape == (2, 6, 32)
    assert valid.tolist()[1] == [False, True, True, False, False, False]


@pytest.mark.parametrize("encoder", ["vision", "text", "both"])
def test_lora_targets_mean_the_same_on_the_timm_hf_twin(timm_hf_twin, encoder):
    model = build_clip(model_cfg(f"local-dir:{timm_hf_twin}")).model
    images = torch.randn(2, 3, 64, 64)
    text = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(text)
    names = apply_lora(model, lora_cfg(ENCODER=encoder, TARGETS=["q", "k", "v", "out", "mlp"]))
    adapted = {name.split(".lora_")[0] for name in names}
    vision = {name for name in adapted if name.startswith("visual.")}
    text_names = adapted - vision
    if encoder in ("vision", "both"):
        assert len(vision) == 6 * 6 and "visual.trunk.blocks.5.attn.q_proj" in vision
        assert (
            "visual.trunk.blocks.0.attn.proj" in vision
            and "visual.trunk.blocks.0.mlp.fc2" in vision
        )
    if encoder in ("text", "both"):
        assert len(text_names) == 2 * 6
        prefix = "text.transformer.encoder.layer.1."
        assert {prefix + "attention.self.value", prefix + "attention.output.dense"} <= text_names
        assert prefix + "output.dense" in text_names
    assert bool(vision) == (encoder != "text") and bool(text_names) == (encoder != "vision")
    model.eval()
    with torch.no_grad():  # B = 0: unchanged until trained
        torch.testing.assert_close(model.encode_image(images), before[0])
        torch.testing.assert_close(model.encode_text(text), before[1])
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.1)
        unmerged = model.encode_image(images), model.encode_text(text)
    merge_lora(model)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), unmerged[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(text), unmerged[1], atol=1e-5, rtol=0)
    assert not torch.allclose(unmerged[0], before[0]) or encoder == "text"


def test_checkpoint_of_another_size_names_the_mismatched_keys(timm_hf_twin, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    for file in ("open_clip_config.json", "vocab.txt", "tokenizer_config.json"):
        (folder / file).write_bytes((timm_hf_twin / file).read_bytes())
    other = open_clip.CLIP(**TINY_CONFIGS["tiny-vit"])
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"does not fit this architecture: missing .*visual\.trunk"
    ):
        build_clip(model_cfg(f"local-dir:{folder}"))


def test_missing_tokenizer_and_weights_name_the_files(timm_hf_twin, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for file in ("open_clip_config.json", "open_clip_model.safetensors"):
        (folder / file).write_bytes((timm_hf_twin / file).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        build_clip(model_cfg(f"local-dir:{folder}"))
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        build_clip(model_cfg(f"local-dir:{folder}"))


def test_hf_clip_twin_loads_and_equals_the_hugging_face_model(hf_clip_twin):
    from transformers import CLIPModel

    bundle = build_clip(model_cfg(f"local-dir:{hf_clip_twin}"))
    reference = CLIPModel.from_pretrained(str(hf_clip_twin), local_files_only=True).eval()
    model = bundle.model
    assert family_of(model).name == "hf-clip-vision + hf-clip-text"
    assert bundle.image_size == 32 and image_feature_dim(model) == 16
    images = torch.randn(2, 3, 32, 32)
    text = bundle.tokenizer(["a photo of abnormal squamous cervical cells", "normal"])
    assert text.shape == (2, 32)
    with torch.no_grad():
        output = reference(input_ids=text, pixel_values=images)
        torch.testing.assert_close(model.encode_image(images, normalize=True), output.image_embeds)
        torch.testing.assert_close(model.encode_text(text, normalize=True), output.text_embeds)
        pooled, tokens = encode_image_tokens(model, images)
        torch.testing.assert_close(pooled, model.encode_image(images))
        pooled_text, words, valid = encode_text_tokens(model, text)
        torch.testing.assert_close(pooled_text, model.encode_text(text))
    assert patch_grid(model) == (4, 4) and tokens.shape == (2, 16, 32)
    # 37 letters cut to 30 + the end token; "normal": 6 letters + the end token
    assert valid.sum(dim=1).tolist() == [31, 7]
    assert float(model.logit_scale.detach()) == float(reference.logit_scale.detach())


def test_hf_clip_hub_id_loads_from_the_local_cache(hf_clip_twin, tmp_path, monkeypatch):
    """`hf-hub:vinid/plip`-style ids: a Hugging Face CLIPModel repository in the hub cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--lab--tiny-plip"
    shutil.copytree(hf_clip_twin, repo / "snapshots" / "89abcdef")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("89abcdef")
    bundle = build_clip(CfgNode({"NAME": "", "PRETRAINED": "", "HF_HUB": "hf-hub:lab/tiny-plip"}))
    assert bundle.identity == "hf-hub:lab/tiny-plip@89abcdef"
    local = build_clip(model_cfg(f"local-dir:{hf_clip_twin}"))
    assert (bundle.image_size, bundle.mean, bundle.std) == (local.image_size, local.mean, local.std)
    images = torch.randn(2, 3, 32, 32)
    text = local.tokenizer(["abnormal cells", "normal"])
    torch.testing.assert_close(bundle.tokenizer(["abnormal cells", "normal"]), text)
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.model.encode_image(images), local.model.encode_image(images)
        )
        torch.testing.assert_close(bundle.model.encode_text(text), local.model.encode_text(text))


def test_towers_that_are_not_aligned_refuse_zero_shot_and_warn(
    resnet_twin, fast_opts, tmp_path, caplog
):
    """fewclip_model.json "aligned": false (a composed model): prompt-predicting methods refuse,
    methods that learn from the prompts warn, image-only methods run silently."""
    folder = tmp_path / "composed"
    shutil.copytree(resnet_twin, folder)
    assert build_clip(model_cfg(f"local-dir:{folder}")).aligned
    (folder / "fewclip_model.json").write_text('{"aligned": false}')
    assert not build_clip(model_cfg(f"local-dir:{folder}")).aligned
    opts = [*fast_opts, "MODEL.NAME", f"local-dir:{folder}"]
    for name in ("ZeroShotCLIP", "TipAdapter"):
        with pytest.raises(ValueError, match=f"{name} classifies .* not aligned"):
            build_trainer(name, opts)
    for name, warned in (("CLIPLoRA", True), ("TipAdapterF", True), ("LinearProbe", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fewclip.trainer"):
            build_trainer(name, opts)
        assert ("not aligned" in caplog.text) == warned, name
    for text, problem in (("[true]", "is not a JSON object"), ('{"aligned": "no"}', "true or")):
        (folder / "fewclip_model.json").write_text(text)
        with pytest.raises(ValueError, match=f"fewclip_model.json.*{problem}"):
            build_clip(model_cfg(f"local-dir:{folder}"))


def test_lora_on_the_hf_clip_twin_targets_its_projections(hf_clip_twin):
    model = build_clip(model_cfg(f"local-dir:{hf_clip_twin}")).model
    images = torch.randn(2, 3, 32, 32)
    names = apply_lora(model, lora_cfg(ENCODER="both", TARGETS=["q", "k", "v", "out"]))
    adapted = {name.split(".lora_")[0] for name in names}
    assert len(adapted) == 2 * 2 * 4
    assert "visual.vision_model.encoder.layers.1.self_attn.out_proj" in adapted
    assert "text.text_model.encoder.layers.0.self_attn.k_proj" in adapted
    assert_merged_equals_unmerged(model, images)


def test_hf_clip_checkpoint_of_another_size_names_the_mismatched_keys(hf_clip_twin, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    for file in ("vocab.json", "merges.txt", "config.json"):
        (folder / file).write_bytes((hf_clip_twin / file).read_bytes())
    state = load_file(str(hf_clip_twin / "model.safetensors"))
    state["visual_projection.weight"] = torch.zeros(8, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape \(1\): visual_projection.weight \(8, 32\)"):
        build_clip(model_cfg(f"local-dir:{folder}"))
    for file in ("vocab.json", "merges.txt"):
        (folder / file).unlink()
    state["visual_projection.weight"] = torch.zeros(16, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        build_clip(model_cfg(f"local-dir:{folder}"))


def test_split_attention_pool_equals_the_resnet_attention_pool():
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(4, 32, 4, 16).eval()
    x = torch.randn(3, 32, 4, 4)
    torch.testing.assert_close(SplitAttentionPool(pool)(x), pool(x), atol=1e-5, rtol=0)


def test_lora_on_the_resnet_twin_adapts_its_attention_pool(resnet_twin):
    bundle = build_clip(model_cfg(f"local-dir:{resnet_twin}"))
    model = bundle.model
    original = open_clip.create_model(f"local-dir:{resnet_twin}", load_weights=False).eval()
    original.load_state_dict(load_file(str(resnet_twin / "open_clip_model.safetensors")))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(images)
        torch.testing.assert_close(before, original.encode_image(images), atol=1e-5, rtol=0)
    assert family_of(model).name == "open_clip-resnet + open_clip-text"
    with pytest.raises(ValueError, match=r"LORA.TARGETS \['mlp'\]: the vision tower"):
        apply_lora(model, lora_cfg(TARGETS=["q", "mlp"]))
    with pytest.raises(ValueError, match="has no patch tokens"):
        patch_grid(model)
    names = apply_lora(model, lora_cfg(TARGETS=["q", "k", "v", "out"]))
    adapted = sorted({name.split(".lora_")[0] for name in names})
    assert adapted == [f"visual.attnpool.{n}_proj" for n in ("c", "k", "q", "v")]
    unmerged = assert_merged_equals_unmerged(model, images)
    assert not torch.allclose(unmerged, before)  # the LoRA layers are on the forward path


def test_lora_on_every_twin_equals_peft_draw_for_draw(twin):
    build = lambda: build_clip(model_cfg(f"local-dir:{twin}"))  # noqa: E731
    config = lora_cfg(ENCODER="both", TARGETS=["q", "v", "out"], RANK=3, DROPOUT=0.1)
    ours, reference = lora_twins(build, config)
    assert_same_state(ours.model, reference.model)
    for model in (ours.model, reference.model):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.copy_(torch.linspace(-0.2, 0.2, parameter.numel()).view_as(parameter))
    images = torch.randn(2, 3, ours.image_size, ours.image_size)
    tokens = ours.tokenizer(["abnormal cells", "normal"])
    assert_same_training_step(ours.model, reference.model, images, tokens)


# ----- every registered trainer on the twin --------------------------------------------------
# twins without patch tokens: trainers that declare needs_patch_tokens stop there in one line
NO_PATCH_TOKENS = ("resnet_twin",)
# the LoRA variants of trainers whose recipe trains something else
LORA_VARIANTS = [
    ("AMLPF", ["TRAINER.AMLPF.STUDENT", "lora"]),
    ("CaMVLA", ["TRAINER.CAMVLA.TUNING", "lora", "LORA.ENCODER", "both"]),
    ("SAVLT", ["LORA.ENCODER", "both", "LORA.TARGETS", "q,v,out"]),
    ("ViTTeacher", ["TRAINER.VITTEACHER.MODE", "lora", "LORA.TARGETS", "q,v,out"]),
]


def build_trainer(trainer_name: str, opts: list[str]):
    cfg = build_config(recipe_for(trainer_name), ROOT / "configs/datasets/synthetic.yaml", opts)
    dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
    split = build_split(dataset, cfg)
    bundle = load_clip(cfg)
    trainer = TRAINERS.get(cfg.TRAINER.NAME)(cfg, bundle, dataset, torch.device("cpu"))
    sets = [build_image_set(items, bundle.image_size, cfg) for items in (split.train, split.val)]
    return dataset, trainer, *sets, build_image_set(split.test, bundle.image_size, cfg)


@pytest.mark.parametrize(
    ("trainer_name", "extra"), [(name, []) for name in PACKAGE_TRAINERS] + LORA_VARIANTS
)
def test_trainer_contract_on_every_family_twin(trainer_name, extra, fast_opts, twin, one_thread):
    model = ["MODEL.NAME", f"local-dir:{twin}"]
    opts = [*fast_opts, *model, "OPTIM.MAX_ITERS", "2", *extra]
    without_tokens = twin.name.rstrip("0123456789") in NO_PATCH_TOKENS
    if without_tokens and TRAINERS.get(trainer_name).needs_patch_tokens:
        with pytest.raises(ValueError, match="no patch tokens"):
            build_trainer(trainer_name, opts)
        return
    dataset, trainer, train, val, test = build_trainer(trainer_name, opts)
    check_trainer_contract(trainer_name, trainer, dataset, train, val, test)


def test_truncated_finds_the_texts_each_tokenizer_cuts(timm_hf_twin, hf_clip_twin):
    """Open_clip's BPE (77 tokens), the BERT twin (32) and the Hugging Face CLIP twin (32)."""
    from fewclip.prompts import truncated

    words = "abnormal cells"
    for name, context in (("tiny-vit", 77), (f"local-dir:{timm_hf_twin}", 32)):
        tokenizer = build_clip(model_cfg(name)).tokenizer
        texts = [words, " ".join(["normal"] * (context - 2)), " ".join(["normal"] * (context - 1))]
        assert truncated(tokenizer, texts) == [False, False, True], name
    tokenizer = build_clip(model_cfg(f"local-dir:{hf_clip_twin}")).tokenizer
    # the twin's vocabulary spells words letter by letter: "normal" is 6 tokens, 2 more for the
    # start and end tokens: 5 words fill the context of 32, 6 are cut
    texts = [" ".join(["normal"] * words) for words in (1, 5, 6)]
    assert truncated(tokenizer, texts) == [False, False, True]


def test_prompts_longer_than_the_text_tower_warn_naming_the_class(hf_clip_twin, fast_opts, caplog):
    opts = [*fast_opts, "TRAINER.ZEROSHOTCLIP.PROMPT_LEVEL", "description"]
    for name, warned in (("tiny-vit", False), (f"local-dir:{hf_clip_twin}", True)):
        _, trainer, *_ = build_trainer("ZeroShotCLIP", [*opts, "MODEL.NAME", name])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fewclip.prompts"):
            trainer.on_eval_start()
        assert ("class 'hsil'" in caplog.text and "truncated" in caplog.text) == warned, name


def test_twin_names_write_each_twin_once_and_load_it_like_a_folder(tmp_path, monkeypatch):
    """MODEL.NAME twin:<family>: the twin is written into the user cache once, loads through the
    local-folder path, and its identity does not depend on where the cache lies."""
    from fewclip.twins import COMPLETE

    identities = []
    for cache in ("one", "two"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
        bundle = build_clip(model_cfg("twin:resnet"))
        identities.append(bundle.identity)
        (folder,) = (tmp_path / cache / "fewclip" / "twins").glob("resnet-*")
        assert (folder / COMPLETE).is_file()
    assert identities[0] == identities[1] and identities[0].startswith("twin:resnet:file-sha1=")
    written = (folder / "open_clip_model.safetensors").stat().st_mtime_ns
    build_clip(model_cfg("twin:resnet"))
    assert (folder / "open_clip_model.safetensors").stat().st_mtime_ns == written
    (folder / COMPLETE).unlink()  # a write that did not finish is written again
    assert build_clip(model_cfg("twin:resnet")).identity == identities[0]
    with pytest.raises(ValueError, match="'twin:rn50': no such twin; choose one of timm-hf"):
        build_clip(model_cfg("twin:rn50"))
