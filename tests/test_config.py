"""Config: merge order, _BASE_ recipes, strict keys with close matches, types, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewclip.config import ConfigError, build_config


def write(path, text):
    path.write_text(text)
    return path


def test_merge_order_defaults_trainer_dataset_recipe_opts(tmp_path):
    dataset = write(tmp_path / "data.yaml", "DATASET:\n  NUM_SHOTS: 8\n  VAL_SHOTS: 3\nSEED: 5\n")
    recipe = write(
        tmp_path / "recipe.yaml",
        "TRAINER:\n  NAME: CLIPLoRA\n  CLIPLORA:\n    PROMPT_LEVEL: short\nSEED: 7\n"
        "DATASET:\n  VAL_SHOTS: 6\n",
    )
    cfg = build_config(recipe, dataset, ["SEED", "9", "OPTIM.LR", "1e-3"])
    assert cfg.DATASET.NUM_SHOTS == 8  # dataset file over defaults
    assert cfg.DATASET.VAL_SHOTS == 6  # recipe over dataset file
    assert cfg.SEED == 9  # opts last
    assert cfg.OPTIM.LR == pytest.approx(1e-3) and isinstance(cfg.OPTIM.LR, float)
    assert cfg.TRAINER.CLIPLORA.PROMPT_LEVEL == "short"
    assert cfg.RECIPE == "recipe"  # run-folder name from the recipe file
    assert cfg.is_frozen()


def test_trainer_node_attached_only_when_selected(tmp_path):
    cfg = build_config(None, None, ["TRAINER.NAME", "ZeroShotCLIP"])
    assert "ZEROSHOTCLIP" in cfg.TRAINER and "CLIPLORA" not in cfg.TRAINER
    with pytest.raises(ConfigError, match="unknown config key TRAINER.CLIPLORA"):
        build_config(None, None, ["TRAINER.NAME", "ZeroShotCLIP", "TRAINER.CLIPLORA.SAMPLER", "x"])


def test_base_inheritance_and_cycle(tmp_path):
    write(tmp_path / "base.yaml", "OPTIM:\n  LR: 0.01\n  BATCH_SIZE: 16\n")
    child = write(tmp_path / "child.yaml", "_BASE_: base.yaml\nOPTIM:\n  LR: 0.5\n")
    cfg = build_config(child)
    assert cfg.OPTIM.LR == 0.5 and cfg.OPTIM.BATCH_SIZE == 16
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="_BASE_ cycle"):
        build_config(tmp_path / "a.yaml")


def test_unknown_key_names_close_matches(tmp_path):
    recipe = write(tmp_path / "r.yaml", "OPTIM:\n  LEARNING_RATE: 0.1\n  WEIGHT_DECAI: 0.1\n")
    with pytest.raises(ConfigError, match=r"OPTIM.LEARNING_RATE in .*r.yaml"):
        build_config(recipe)
    with pytest.raises(ConfigError, match="did you mean OPTIM.WEIGHT_DECAY"):
        build_config(None, None, ["OPTIM.WEIGHT_DECAI", "0.1"])


def test_wrong_type_and_yaml_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="wrong type for OPTIM.BATCH_SIZE"):
        build_config(None, None, ["OPTIM.BATCH_SIZE", "big"])
    broken = write(tmp_path / "broken.yaml", "OPTIM:\n  LR: [1, 2\n  BATCH_SIZE: 3\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*broken.yaml line \d+"):
        build_config(broken)
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        build_config(tmp_path / "missing.yaml")
    with pytest.raises(Exception, match="unknown trainer 'NoSuchTrainer'"):
        build_config(None, None, ["TRAINER.NAME", "NoSuchTrainer"])


def test_list_values_keep_string_class_names(tmp_path):
    cfg = build_config(None, None, ["DATASET.CLASS_NAMES", "1,2,10", "LORA.LAYERS", "[0, 1]"])
    assert cfg.DATASET.CLASS_NAMES == ["1", "2", "10"]
    assert cfg.LORA.LAYERS == [0, 1]


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("EVAL.SELECT", "best", "last, best_val"),
        ("INPUT.AUGMENT", "flip", "crop_flip, none"),
        ("PRECISION", "fp16", "auto, fp32, bf16"),
        ("DATASET.SHOTS_PER", "center", "class, class_center"),
        ("DATASET.INSUFFICIENT_SHOTS", "skip", "error, take_all"),
        ("LORA.ENCODER", "image", "vision, text, both"),
        ("LORA.TARGETS", "['q', 'proj']", "q, k, v, out, mlp"),
    ],
)
def test_enumerated_keys_are_checked_at_config_time_with_their_choices(key, value, choices):
    repo = Path(__file__).resolve().parent.parent
    recipe = str(repo / "configs" / "trainers" / "clip_lora.yaml")
    dataset = str(repo / "configs" / "datasets" / "synthetic.yaml")
    with pytest.raises(ConfigError, match=f"{key} .* is not one of {choices}$"):
        build_config(recipe, dataset, [key, value])


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--shots", "4", "0"], ["--jobs", "-2"]])
def test_non_positive_counts_on_the_command_line_are_errors(flags, capsys):
    from fewclip.cli import parse_args

    with pytest.raises(SystemExit) as error:
        parse_args(flags)
    assert error.value.code == 2 and "must be at least 1" in capsys.readouterr().err
