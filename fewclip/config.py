"""Configuration: core defaults, per-trainer/per-dataset nodes, YAML recipes with `_BASE_`, opts.

Merge order (DESIGN.md): defaults -> trainer node -> dataset node -> dataset YAML -> recipe YAML ->
`KEY VALUE` opts -> freeze. Unknown keys and wrong types fail here, before any data loads, with a
one-line message naming the key (and close matches) or the file.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode

from fewclip.defaults import get_cfg_defaults
from fewclip.registry import DATASETS, TRAINERS

# Keys that say where or how verbosely a run writes, not what it computes (not in the config hash).
NON_SEMANTIC_KEYS = (
    "OUTPUT_DIR",
    "RUN_DIR",
    "VERBOSE",
    "CACHE_DIR",
    "PLUGINS",
    "TENSORBOARD",
    "CHECKPOINT",
    "PERF",  # speed only (channels_last, compile, device-held images)
)
# Lists whose default is empty hold strings (class and center names) unless listed here.
INT_LIST_KEYS = {"LORA.LAYERS", "EVAL.RETRIEVAL"}
# Core keys with declared choices: a value outside them fails at merge time, naming key and choices.
CHOICES = {
    "INPUT.CROP_INTERPOLATION": ("bilinear", "bicubic"),
    "LORA.SCALING": ("alpha_over_r", "alpha_over_sqrt_r"),
    "DATASET.TRAIN_FRACTION_ROUNDING": ("floor", "ceil"),
    "EVAL.RETRIEVAL_NORMALISE": ("centre_then_normalise", "normalise_then_centre"),
    "EVAL.SELECT": ("last", "best_val"),
    "INPUT.AUGMENT": ("crop_flip", "none"),
    "PRECISION": ("auto", "fp32", "bf16"),
    "DATASET.SHOTS_PER": ("class", "class_center"),
    "DATASET.INSUFFICIENT_SHOTS": ("error", "take_all"),
    "LORA.ENCODER": ("vision", "text", "both"),
    "LORA.TARGETS": ("q", "k", "v", "out", "mlp"),  # a list: each item is one of these
    "TRAINER.LINEARPROBE.CLASS_WEIGHT": ("none", "balanced"),
}
# Numeric keys and the interval their value must lie in: (low, low inclusive, high, high
# inclusive); checked at config time, before any data or model is loaded.
RANGES = {
    "OPTIM.LR": (0.0, False, None, False),
    "OPTIM.BATCH_SIZE": (1, True, None, False),
    "OPTIM.WEIGHT_DECAY": (0.0, True, None, False),
    "OPTIM.MIN_LR": (0.0, True, None, False),
    "OPTIM.WARMUP_ITERS": (0, True, None, False),
    "OPTIM.WARMUP_FRACTION": (0.0, True, 1.0, False),
    "OPTIM.WARMUP_CONSTANT_LR": (0.0, True, None, False),
    "OPTIM.ITERS_PER_SHOT": (0, True, None, False),
    "OPTIM.MAX_ITERS": (0, True, None, False),
    "OPTIM.GRAD_CLIP": (0.0, True, None, False),
    "OPTIM.COSINE_ITERS": (0, True, None, False),
    "OPTIM.EARLY_STOP_EPOCHS": (0, True, None, False),
    "EVAL.BATCH_SIZE": (1, True, None, False),
    "EVAL.ECE_BINS": (1, True, None, False),
    "DATASET.NUM_SHOTS": (0, True, None, False),
    "DATASET.VAL_SHOTS": (0, True, None, False),
    "DATASET.TRAIN_FRACTION": (0.0, True, 1.0, True),
    "LORA.RANK": (1, True, None, False),
    "LORA.DROPOUT": (0.0, True, 1.0, False),
    "PERF.THREADS": (0, True, None, False),
}


# Datasets whose class says nothing about the data: their display name defaults to the YAML's stem.
GENERIC_DATASETS = ("ImageFolder", "CSVDataset")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", error)
        raise ConfigError(f"YAML syntax error in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def load_yaml_with_base(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, merging it over the files named in its `_BASE_` (str or list, relative)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"_BASE_ cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_BASE_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_update(merged, load_yaml_with_base(path.parent / base, (*_chain, path)))
    _deep_update(merged, data)
    return merged


def _deep_update(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Match `value` to the type of the default; ints widen to floats, tuples and lists convert."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (str, int, float)):
            value = [value]
        if isinstance(value, (list, tuple)):
            item_type = type(default[0]) if default else int if key in INT_LIST_KEYS else str
            try:
                items = [item_type(item) for item in value]
            except (TypeError, ValueError):
                items = None
            if items is not None:
                return type(default)(items)
    elif default is None:
        return value
    raise ConfigError(
        f"wrong type for {key} in {source}: expected {type(default).__name__} "
        f"(like {default!r}), got {type(value).__name__} {value!r}"
    )


def check_choice(key: str, value: Any, source: str = "the config") -> None:
    """A key with declared CHOICES must hold one of them; the error names key and choices."""
    if key not in CHOICES:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item not in CHOICES[key]:
            raise ConfigError(f"{key} {item!r} in {source} is not one of {', '.join(CHOICES[key])}")


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def _unknown_key(key: str, node: CfgNode, prefix: str, source: str) -> ConfigError:
    """Close matches by abbreviation (LEARNING_RATE -> LR), by the last key part, then whole."""
    names = list(node)
    abbreviated = [n for n in names if n == _initials(key) or _initials(n) == key]
    by_part = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    whole = difflib.get_close_matches(prefix + key, [prefix + n for n in names], n=3, cutoff=0.6)
    close = list(dict.fromkeys([*(prefix + n for n in abbreviated + by_part), *whole]))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix + key} in {source}{hint}")


def merge_dict(cfg: CfgNode, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Merge a nested dict into `cfg`; every key must exist in the defaults."""
    for key, value in data.items():
        if key not in cfg:
            raise _unknown_key(key, cfg, prefix, source)
        if isinstance(cfg[key], CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key} in {source} must be a mapping of keys")
            merge_dict(cfg[key], value, source, prefix + key + ".")
        else:
            cfg[key] = _coerce(value, cfg[key], prefix + key, source)
            check_choice(prefix + key, cfg[key], source)


def _parse_opt_value(raw: str, default: Any) -> Any:
    """CLI values: literals where the default is not a string (so '1e-3' is a float, '3' an int).

    Lists take `[a, b]` or `a,b`; their items are typed by `_coerce` against the default.
    """
    if isinstance(default, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(default, (list, tuple)) and isinstance(value, str) and raw.lstrip()[:1] == "[":
        try:  # YAML flow syntax: [NILM, LSIL] or [DATASET.CLASS_NAMES, [NILM, LSIL]], one value
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, list):
            return [_opt_list_item(item) for item in value]
    if isinstance(default, (list, tuple)) and isinstance(value, str):  # a,b or [a/b.png, c]
        return [part.strip() for part in value.strip("[]() ").split(",") if part.strip()]
    return value


def _opt_list_item(item: Any) -> Any:
    """An item of a YAML list opt; a nested list becomes its literal (`['NILM', 'LSIL']`), which
    reads back as one value when the item is itself an opt value (EVAL.CROSS_DATASET_OPTS)."""
    return repr([str(part) for part in item]) if isinstance(item, list) else item


def opts_to_dict(opts: Sequence[str], cfg: CfgNode) -> dict[str, Any]:
    """`["OPTIM.LR", "1e-3", ...]` -> nested dict, typed against the defaults in `cfg`."""
    if len(opts) % 2:
        raise ConfigError(f"opts must be KEY VALUE pairs; {opts[-1]!r} has no value")
    nested: dict[str, Any] = {}
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        node, parts = cfg, full_key.split(".")
        for index, part in enumerate(parts):
            if not isinstance(node, CfgNode) or part not in node:
                parent = ".".join(parts[:index])
                prefix = parent + "." if parent else ""
                raise _unknown_key(
                    part,
                    node if isinstance(node, CfgNode) else CfgNode(),
                    prefix,
                    "command-line opts",
                )
            node = node[part]
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_opt_value(str(raw), node)
    return nested


def _peek(key: str, sources: list[dict[str, Any]], default: str) -> str:
    section, name = key.split(".")
    value = default
    for data in sources:
        value = (
            data.get(section, {}).get(name, value) if isinstance(data.get(section), dict) else value
        )
    return str(value)


OPT_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")  # a config key: DATASET.ROOT, SEED


def split_opts(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(flags and files, `KEY VALUE` opts) of a tool's arguments: a token like DATASET.ROOT and
    the token after it are an opt wherever they stand, so opts may come before or after flags."""
    flags, opts, index = [], [], 0
    while index < len(argv):
        if OPT_KEY.match(argv[index]) and index + 1 < len(argv):
            opts += argv[index : index + 2]
            index += 2
        else:
            flags.append(argv[index])
            index += 1
    return flags, opts


def build_config(
    recipe: str | Path | None = None,
    dataset_config: str | Path | None = None,
    opts: Sequence[str] = (),
    freeze: bool = True,
) -> CfgNode:
    """Resolve one run's config in the documented order and return it frozen."""
    cfg = get_cfg_defaults()
    files: list[tuple[str, dict[str, Any]]] = []
    if dataset_config:
        files.append((str(dataset_config), load_yaml_with_base(dataset_config)))
    if recipe:
        files.append((str(recipe), load_yaml_with_base(recipe)))
    raw_opts = {full_key: raw for full_key, raw in zip(opts[0::2], opts[1::2])}
    peek_sources = [data for _, data in files]
    plugins = list(cfg.PLUGINS)
    for data in peek_sources:
        plugins = list(data.get("PLUGINS", plugins))
    if "PLUGINS" in raw_opts:
        plugins = _parse_opt_value(raw_opts["PLUGINS"], [])
    if plugins:
        from fewclip.registry import load_plugins

        load_plugins(plugins)
    trainer_name = raw_opts.get(
        "TRAINER.NAME", _peek("TRAINER.NAME", peek_sources, cfg.TRAINER.NAME)
    )
    dataset_name = raw_opts.get(
        "DATASET.NAME", _peek("DATASET.NAME", peek_sources, cfg.DATASET.NAME)
    )
    recipe_trainer = _peek("TRAINER.NAME", [files[-1][1]], "") if recipe else ""
    if (  # a subclass of the recipe's trainer (a test double, a variant) runs that recipe
        recipe_trainer
        and "RECIPE" not in raw_opts
        and not issubclass(TRAINERS.get(trainer_name), TRAINERS.get(recipe_trainer))
    ):
        raise ConfigError(
            f"TRAINER.NAME {trainer_name} in opts overrides {recipe_trainer} of recipe "
            f"{recipe}, whose name would file the run: use a recipe of {trainer_name} "
            "(or set RECIPE to name the variant)"
        )
    attach_nodes(cfg, trainer_name, dataset_name)
    for source, data in files:
        merge_dict(cfg, data, source)
    if recipe and "RECIPE" not in files[-1][1] and "RECIPE" not in raw_opts:
        cfg.RECIPE = Path(recipe).stem
    merge_dict(cfg, opts_to_dict(list(opts), cfg), "command-line opts")
    if cfg.TRAINER.NAME != trainer_name or cfg.DATASET.NAME != dataset_name:
        raise ConfigError(
            "TRAINER.NAME and DATASET.NAME must be set at top level of a file or in opts"
        )
    check_samplers(cfg)
    check_ranges(cfg)
    cfg.DATASET.DISPLAY_NAME = resolve_display_name(cfg, dataset_config)
    if freeze:
        cfg.freeze()
    return cfg


def check_ranges(cfg: CfgNode) -> None:
    """Every RANGES key inside its interval; the error names the key, the value and the bounds."""
    for key, (low, low_in, high, high_in) in RANGES.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, CfgNode) else None
        if node is None:
            continue
        too_low = low is not None and (node < low if low_in else node <= low)
        too_high = high is not None and (node > high if high_in else node >= high)
        if too_low or too_high:
            bounds = []
            if low is not None:
                bounds.append(f"{'>=' if low_in else '>'} {low}")
            if high is not None:
                bounds.append(f"{'<=' if high_in else '<'} {high}")
            raise ConfigError(f"{key} {node!r} must be {' and '.join(bounds)}")


def check_samplers(cfg: CfgNode) -> None:
    """A trainer node's SAMPLER must be a registered sampler: caught here, not inside fit."""
    from fewclip.registry import SAMPLERS, RegistryError

    for key, node in cfg.TRAINER.items():
        if isinstance(node, CfgNode) and "SAMPLER" in node and SAMPLERS.names():
            try:
                SAMPLERS.get(node.SAMPLER)
            except RegistryError as error:
                raise ConfigError(f"TRAINER.{key}.SAMPLER: {error}") from None


def resolve_display_name(cfg: CfgNode, dataset_config: str | Path | None) -> str:
    """DATASET.DISPLAY_NAME, or its default: the dataset YAML's stem for a generic dataset (so two
    image folders get two names), the registered class name otherwise; path-safe."""
    name = cfg.DATASET.DISPLAY_NAME
    if not name:
        generic = cfg.DATASET.NAME in GENERIC_DATASETS and dataset_config
        name = Path(dataset_config).stem if generic else cfg.DATASET.NAME
    if name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"DATASET.DISPLAY_NAME {name!r} is used as a folder name: no slashes, not . or .."
        )
    return name


def attach_nodes(cfg: CfgNode, trainer_name: str, dataset_name: str) -> None:
    """Attach the selected trainer's node at TRAINER.<KEY> and the dataset's at DATASET.<KEY>."""
    trainer_cls = TRAINERS.get(trainer_name)
    dataset_cls = DATASETS.get(dataset_name)
    cfg.TRAINER.NAME = trainer_cls.__name__
    cfg.DATASET.NAME = dataset_cls.__name__
    for parent, cls in ((cfg.TRAINER, trainer_cls), (cfg.DATASET, dataset_cls)):
        node = cls.config_node() if hasattr(cls, "config_node") else None
        if node is not None:
            parent[cls.config_key()] = node


def compute_config_hash(cfg: CfgNode) -> str:
    """Hash of everything that changes what a run computes (not where it writes)."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in NON_SEMANTIC_KEYS}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def config_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for JSON."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            out[key] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out
