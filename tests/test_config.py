"""Config: merge order, _BASE_ recipes, strict keys with close matches, types, bad files."""

from __future__ import annotations

import re
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
    with pytest.raises(ConfigError, match=f"{key} .* is not one of {choices}$"):
        clip_lora_config(key, value)


def clip_lora_config(*opts: str):
    repo = Path(__file__).resolve().parent.parent
    recipe = str(repo / "configs" / "trainers" / "clip_lora.yaml")
    return build_config(recipe, str(repo / "configs" / "datasets" / "synthetic.yaml"), list(opts))


@pytest.mark.parametrize("flags", [["--jobs", "0"], ["--shots", "4", "0"], ["--jobs", "-2"]])
def test_non_positive_counts_on_the_command_line_are_errors(flags, capsys):
    from fewclip.cli import parse_args

    with pytest.raises(SystemExit) as error:
        parse_args(flags)
    assert error.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, bounds",
    [
        ("OPTIM.LR", "-1.0", "> 0.0"),
        ("OPTIM.BATCH_SIZE", "0", ">= 1"),
        ("EVAL.BATCH_SIZE", "0", ">= 1"),
        ("OPTIM.WARMUP_FRACTION", "1.0", ">= 0.0 and < 1.0"),
        ("DATASET.TRAIN_FRACTION", "1.5", ">= 0.0 and <= 1.0"),
        ("LORA.DROPOUT", "-0.1", ">= 0.0 and < 1.0"),
    ],
)
def test_numeric_keys_out_of_range_are_config_errors(key, value, bounds):
    with pytest.raises(ConfigError, match=f"^{key} .* must be {bounds}$"):
        clip_lora_config(key, value)


SWEEP_HEAD = "datasets: [../configs/datasets/synthetic.yaml]\n"


@pytest.mark.parametrize(
    "body, message",
    [
        ("seeds: []\n", "seeds in sweep file .* must be a non-empty list of integers"),
        ("shots: []\n", "shots in sweep file .* must be a non-empty list"),
        ("shots: 4\n", r"shots .* \(got 4\)"),
        ("shots: [4, 0]\n", r"shots .*: \[0\] are not positive integers"),
        ("seeds: [1, x]\n", r"seeds .*: \['x'\] are not non-negative integers"),
        ("recipes: zeroshot.yaml\n", "recipes in sweep file .* must be a list"),
        ("recipes: [a\nshots: [1]\n", "YAML syntax error in sweep file .* line 3"),
    ],
)
def test_bad_sweep_files_are_one_line_naming_the_key(tmp_path, body, message):
    from fewclip.sweep import load_sweep_file

    sweep = write(tmp_path / "sweep.yaml", SWEEP_HEAD + body)
    with pytest.raises(ConfigError, match=message) as error:
        load_sweep_file(sweep)
    assert "\n" not in str(error.value)


def test_bad_folders_plugins_and_reruns_are_one_line_before_any_work(tmp_path, capsys, fast_opts):
    """--aggregate / --report on a missing or empty folder, a missing plugin file, an output path
    under a file, and a rerun of complete cells with another config: exit 2, one line, and no
    cell starts (the rerun's results stay as they were)."""
    from fewclip.cli import main

    repo = Path(__file__).resolve().parent.parent
    zeroshot = str(repo / "configs" / "trainers" / "zeroshot.yaml")
    dataset = str(repo / "configs" / "datasets" / "synthetic.yaml")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    run = ["--recipe", zeroshot, "--dataset-config", dataset, "--shots", "1", *fast_opts]
    cases = [
        (["--aggregate", str(tmp_path / "nowhere")], "--aggregate .*nowhere: no such folder"),
        (["--report", str(tmp_path / "empty")], "no results.json under it"),
        ([*run, "PLUGINS", "[/nowhere/plug.py]"], "PLUGINS: '/nowhere/plug.py' does not exist"),
        ([*run, "OUTPUT_DIR", str(tmp_path / "a_file" / "out")], "a_file is a file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and re.search(message, error), error
    assert main(run) == 0
    results = next((Path(fast_opts[fast_opts.index("OUTPUT_DIR") + 1])).rglob("results.json"))
    before = results.read_bytes()
    capsys.readouterr()
    assert main([*run, "EVAL.ECE_BINS", "10"]) == 2
    error = capsys.readouterr().err.strip()
    assert "holds complete results of a different config (EVAL.ECE_BINS)" in error
    assert error.count("\n") == 0 and results.read_bytes() == before
