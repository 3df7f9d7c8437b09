"""Per-class prompt texts: templates x labels (the CLIP ensemble), short and long descriptions.

A prompt file is YAML:

    templates: ["a cervical cytology image of {}.", ...]
    classes:
      normal: {label: "normal squamous cells", short: "...", description: "..."}

Every dataset class must appear under `classes` with at least a `label`; classes in the file
that the dataset does not have are ignored, so one file can serve several datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LOGGER = logging.getLogger(__name__)
LEVELS = ("label", "short", "description")  # the keys of a class entry in a prompt file
# Levels a trainer may ask for: the file's, plus "word", the bare label text without a template
# (AMLPF-CLIP's level 1 is the class word alone, models.py:68 `text_only_label`).
TEXT_LEVELS = (*LEVELS, "word")

DEFAULT_TEMPLATES = [
    "a photo of {}.",
    "a medical image of {}.",
    "a microscopy image of {}.",
    "an image showing {}.",
]


class PromptError(ValueError):
    """A bad prompt file or prompt level; the message names the file, class or level."""


@dataclass
class PromptSet:
    """Prompt texts of one dataset; `classes` is ordered like the dataset's class names."""

    templates: list[str]
    classes: dict[str, dict[str, str]]
    source: str = field(default="", compare=False)  # file the prompts came from (for errors)

    def texts(self, level: str) -> list[list[str]]:
        """Texts per class, in class order.

        "label": every template formatted with the class label (the prompt ensemble);
        "word": the label text alone; "short" / "description": that class's one text.
        """
        if level not in TEXT_LEVELS:
            choices = ", ".join(TEXT_LEVELS)
            raise PromptError(f"unknown prompt level {level!r}; choose one of {choices}")
        if level == "word":
            return [[entry["label"]] for entry in self.classes.values()]
        if level == "label":
            return [
                [t.format(entry["label"]) for t in self.templates]
                for entry in self.classes.values()
            ]
        missing = [name for name, entry in self.classes.items() if not entry.get(level)]
        if missing:
            where = f" in {self.source}" if self.source else ""
            raise PromptError(
                f"prompt level {level!r} missing for classes {', '.join(missing)}{where}"
            )
        return [[entry[level]] for entry in self.classes.values()]


def _check_templates(templates: object, source: str) -> list[str]:
    if not isinstance(templates, list) or not templates:
        raise PromptError(f"'templates' in {source} must be a non-empty list of strings")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise PromptError(f"template {template!r} in {source} must be a string with one '{{}}'")
    return list(templates)


def load_prompt_file(path: str | Path, class_names: Sequence[str]) -> PromptSet:
    """Read a prompt YAML file and keep the entries of `class_names`, in that order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        message = f"YAML syntax error in prompt file {path}: {error}".splitlines()[0]
        raise PromptError(message) from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise PromptError(f"prompt file {path} must be a mapping with 'templates' and 'classes'")
    templates = _check_templates(data.get("templates", DEFAULT_TEMPLATES), str(path))
    entries = data["classes"]
    missing = [name for name in class_names if name not in entries]
    if missing:
        raise PromptError(f"prompt file {path} has no entry for classes {', '.join(missing)}")
    classes: dict[str, dict[str, str]] = {}
    for name in class_names:
        entry = entries[name]
        if isinstance(entry, str):  # shorthand: `normal: "normal squamous cells"`
            entry = {"label": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise PromptError(f"class {name!r} in prompt file {path} needs a 'label' string")
        unknown = sorted(set(entry) - set(LEVELS))
        if unknown:
            raise PromptError(f"class {name!r} in prompt file {path} has unknown keys {unknown}")
        classes[name] = {level: str(entry[level]) for level in LEVELS if entry.get(level)}
    return PromptSet(templates=templates, classes=classes, source=str(path))


def build_default_prompts(
    class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> PromptSet:
    """Prompts made from folder names ("high_grade" -> "high grade") when no file is given."""
    classes = {}
    for name in class_names:
        label = name.replace("_", " ").replace("-", " ").strip()
        text = templates[0].format(label)
        classes[name] = {"label": label, "short": text, "description": text}
    return PromptSet(templates=list(templates), classes=classes, source="class names")


def truncated(tokenizer: Callable[..., object], texts: Sequence[str]) -> list[bool]:
    """Which texts the tokenizer cuts to fit its context: their ids at the tokenizer's own length
    L differ from the first L ids at length 2 L (a cut text ends with the end token at L - 1)."""
    if not texts:
        return []
    short = tokenizer(list(texts))
    length = short.shape[1]
    long = tokenizer(list(texts), context_length=2 * length)
    return [not bool(same) for same in (short == long[:, :length]).all(dim=1)]


def warn_truncated(
    tokenizer: Callable[..., object],
    texts_per_class: Sequence[Sequence[str]],
    class_names: Sequence[str],
    level: str,
) -> None:
    """One warning per class whose prompt texts at `level` are longer than the text tower's
    context: they are truncated, never silently."""
    flat = [text for texts in texts_per_class for text in texts]
    cut = iter(truncated(tokenizer, flat))
    for name, texts in zip(class_names, texts_per_class, strict=True):
        long = [text for text in texts if next(cut)]
        if long:
            LOGGER.warning(
                "class %r: %d prompt text(s) at level %r are longer than the text tower's"
                " context and are truncated, e.g. %r",
                name,
                len(long),
                level,
                long[0],
            )
