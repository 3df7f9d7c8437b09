"""fewclip.compose on tiny stand-ins of real weights (timm's `test_efficientnet` with random
weights written as a timm state dict, a tiny Hugging Face BERT folder): the composed folder loads
through `build_clip` as a user's would, with the source weights, its own normalisation, random
projections marked unaligned, and the trainers that apply to a CNN image tower."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_families import build_trainer, lora_cfg, model_cfg
from test_trainers import check_trainer_contract
from transformers import BertModel

from fewclip.backbones import build_clip
from fewclip.compose import (
    MODEL_INFO_FILE,
    rename_efficientnet_pytorch_keys,
    write_composed_model,
)
from fewclip.families import family_of, image_feature_dim
from fewclip.lora import apply_lora
from fewclip.twins import write_bert_model

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> SimpleNamespace:
    """timm-format image weights (with their classifier) and a BERT folder, seeded random."""
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(3)
    image_model = timm.create_model("test_efficientnet").eval()
    state = {name: tensor.contiguous() for name, tensor in image_model.state_dict().items()}
    save_file(state, str(folder / "image.safetensors"))
    return SimpleNamespace(
        image_model=image_model,
        image_weights=folder / "image.safetensors",
        text_folder=write_bert_model(folder / "bert"),
    )


@pytest.fixture(scope="module")
def composed(tmp_path_factory, sources) -> Path:
    return write_composed_model(
        tmp_path_factory.mktemp("composed"),
        image_model="test_efficientnet",
        image_weights=sources.image_weights,
        text_folder=sources.text_folder,
        embed_dim=24,
        mean=MEAN,
        std=STD,
        image_size=64,
        context_length=32,
    )


def test_composed_model_loads_with_the_source_weights_and_its_normalisation(composed, sources):
    bundle = build_clip(model_cfg(f"local-dir:{composed}"))
    model = bundle.model
    assert (bundle.mean, bundle.std, bundle.image_size) == (MEAN, STD, 64)
    trunk = model.visual.trunk.state_dict()
    source = sources.image_model.state_dict()
    assert set(source) - set(trunk) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(trunk[key], source[key]) for key in trunk)
    bert = BertModel.from_pretrained(str(sources.text_folder), add_pooling_layer=False)
    text = model.text.transformer.state_dict()
    assert text.keys() == bert.state_dict().keys()
    assert all(torch.equal(text[key], value) for key, value in bert.state_dict().items())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = sources.image_model.forward_head(
            sources.image_model.forward_features(images), pre_logits=True
        )
        torch.testing.assert_close(model.encode_image(images), model.visual.head(pooled))
    assert image_feature_dim(model) == 24
    assert bundle.tokenizer(["a cell"]).shape == (1, 32)
    info = json.loads((composed / MODEL_INFO_FILE).read_text())
    assert info["aligned"] is False and info["image"]["timm_model"] == "test_efficientnet"
    if hasattr(bundle, "aligned"):  # the ClipBundle field read from fewclip_model.json
        assert bundle.aligned is False


def test_projections_are_seeded_so_two_builds_are_identical(composed, sources, tmp_path):
    again = write_composed_model(
        tmp_path, "test_efficientnet", sources.image_weights, sources.text_folder, 24, MEAN,
        STD, 64, context_length=32,
    )  # fmt: skip
    weights = "open_clip_model.safetensors"
    assert (again / weights).read_bytes() == (composed / weights).read_bytes()


def test_lora_goes_on_the_text_tower_of_a_cnn_image_tower(composed):
    model = build_clip(model_cfg(f"local-dir:{composed}")).model
    assert family_of(model).name == "timm-cnn + hf-bert"
    with pytest.raises(ValueError, match=r"vision tower \(timm-cnn\) has no such layers"):
        apply_lora(model, lora_cfg(ENCODER="vision"))
    names = apply_lora(model, lora_cfg(ENCODER="text", TARGETS=["q", "k", "v"]))
    assert names and all(name.startswith("text.transformer.encoder.layer.") for name in names)


@pytest.mark.parametrize(
    ("trainer_name", "extra"),
    [
        ("LinearProbe", []),
        ("ViTTeacher", []),  # the CervixFM probe: fixed features of the visual tower
        ("ViTTeacher", ["TRAINER.VITTEACHER.MODE", "finetune"]),
        ("CLIPLoRA", ["LORA.ENCODER", "text"]),
    ],
)
def test_trainers_run_on_the_composed_model(trainer_name, extra, composed, fast_opts, one_thread):
    opts = [*fast_opts, "MODEL.NAME", f"local-dir:{composed}", "OPTIM.MAX_ITERS", "2", *extra]
    dataset, trainer, train, val, test = build_trainer(trainer_name, opts)
    check_trainer_contract(trainer_name, trainer, dataset, train, val, test)


def test_zero_shot_refuses_the_unaligned_composed_model(composed, fast_opts):
    opts = [*fast_opts, "MODEL.NAME", f"local-dir:{composed}"]
    with pytest.raises(ValueError, match="ZeroShotCLIP classifies .* not aligned"):
        build_trainer("ZeroShotCLIP", opts)


def test_bad_normalisation_context_or_weights_are_one_line_errors(sources, tmp_path):
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        write_composed_model(
            tmp_path, "test_efficientnet", sources.image_weights, sources.text_folder, 24,
            (0.5,), (0.5,), 64,
        )  # fmt: skip
    with pytest.raises(ValueError, match="context_length 77 exceeds .*bert's 64"):
        write_composed_model(
            tmp_path, "test_efficientnet", sources.image_weights, sources.text_folder, 24, MEAN,
            STD, 64,
        )  # fmt: skip
    with pytest.raises(ValueError, match="do not fit timm's trunk: missing"):
        write_composed_model(
            tmp_path, "test_convnext", sources.image_weights, sources.text_folder, 24, MEAN,
            STD, 64, context_length=32,
        )  # fmt: skip


def test_efficientnet_pytorch_keys_map_onto_timm_stages():
    trunk = SimpleNamespace(blocks=[["ds"], ["ir", "ir"]])  # stage depths 1 and 2
    tensor = torch.zeros(1)
    names = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.bias": "blocks.0.0.bn1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.weight": "blocks.0.0.bn2.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn0.weight": "blocks.1.0.bn1.weight",
        "_blocks.1._depthwise_conv.weight": "blocks.1.0.conv_dw.weight",
        "_blocks.1._bn1.running_var": "blocks.1.0.bn2.running_var",
        "_blocks.1._project_conv.weight": "blocks.1.0.conv_pwl.weight",
        "_blocks.1._bn2.num_batches_tracked": "blocks.1.0.bn3.num_batches_tracked",
        "_blocks.2._expand_conv.weight": "blocks.1.1.conv_pw.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.bias": "classifier.bias",
    }
    renamed = rename_efficientnet_pytorch_keys(dict.fromkeys(names, tensor), trunk)
    assert renamed == {new: tensor for new in names.values()}
    with pytest.raises(ValueError, match="_se_reduce.weight has no timm counterpart"):
        rename_efficientnet_pytorch_keys({**names, "_blocks.1._se_reduce.weight": tensor}, trunk)
    with pytest.raises(ValueError, match="have 2 EfficientNet blocks, timm's trunk 3"):
        rename_efficientnet_pytorch_keys(
            {"_blocks.0._bn1.bias": 0, "_blocks.1._bn1.bias": 0}, trunk
        )


def load_build_tool():
    spec = importlib.util.spec_from_file_location("tool_build", ROOT / "tools/build_real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_tool_names_the_pip_package_of_a_missing_wheel(tmp_path, monkeypatch, capsys):
    tool = load_build_tool()
    absent = tool.WheelModel("no-such-wheel-model", "no_such_wheel_model", "m.pth", "MIT")
    monkeypatch.setitem(tool.IMAGE_MODELS, "efficientnet-lite0", (absent, "tf_efficientnet_lite0"))
    assert tool.main(["--out", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "pip install no-such-wheel-model" in error
    assert not (tmp_path / "model").exists()
