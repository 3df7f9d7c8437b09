"""Cross-dataset evaluation through a declared label map (source classes -> target classes).

A model trained on one label space (Herlev's 7 classes) is evaluated on another dataset's
classes (a Bethesda 3-way view) by summing the probabilities of the source classes mapped to
each target class. The map is a YAML file:

    mapping:
      normal_superficiel: normal
      light_dysplastic: lsil
      carcinoma_in_situ: hsil
      some_source_class: null   # dropped: its probability is removed, the rest renormalised
    drop: [scc]                 # optional: target classes left out of the evaluation

Every source class must be declared (mapped or null) and every target class must receive at
least one source class, unless `drop` leaves it out: the one way to evaluate on a subset of the
target's classes (the images of a dropped class are removed and counted, never silently).
Otherwise the error names the classes. Nothing is matched by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fewclip.metrics import compute_metrics, compute_metrics_by_center


class LabelMapError(ValueError):
    """A label map that does not fit the two label spaces; the message names the classes."""


@dataclass(frozen=True)
class LabelMap:
    source_classes: list[str]
    target_classes: list[str]
    mapping: dict[str, str | None]  # source class -> target class, None = dropped
    source: str = field(default="", compare=False)  # the file it came from (for messages)
    dropped: list[str] = field(default_factory=list)  # target classes left out (`drop:`)

    def matrix(self) -> np.ndarray:
        """(S, T) 0/1 matrix: entry [s, t] = 1 when source class s maps to target class t."""
        matrix = np.zeros((len(self.source_classes), len(self.target_classes)))
        for row, name in enumerate(self.source_classes):
            target = self.mapping[name]
            if target is not None:
                matrix[row, self.target_classes.index(target)] = 1.0
        return matrix


def build_label_map(
    mapping: Mapping[str, Any],
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    source: str = "",
    drop: Sequence[str] = (),
) -> LabelMap:
    """Check a source -> target mapping against both class lists and return a LabelMap whose
    target classes are `target_classes` without the `drop`ped ones (in the same order)."""
    where = f" in {source}" if source else ""
    not_targets = [name for name in drop if name not in target_classes]
    if not_targets:
        raise LabelMapError(
            f"label map{where} drops {', '.join(not_targets)}, which are not target classes "
            f"({', '.join(target_classes)})"
        )
    onto_dropped = sorted(name for name, target in mapping.items() if target in drop)
    if onto_dropped:
        raise LabelMapError(
            f"label map{where} maps {', '.join(onto_dropped)} to a dropped class: map them to "
            "null or to a kept class"
        )
    target_classes = [name for name in target_classes if name not in drop]
    if not target_classes:
        raise LabelMapError(f"label map{where} drops every target class")
    undeclared = [name for name in source_classes if name not in mapping]
    if undeclared:
        raise LabelMapError(
            f"label map{where} declares no target for source classes {', '.join(undeclared)} "
            "(map each to a target class or to null)"
        )
    unknown_sources = [name for name in mapping if name not in source_classes]
    if unknown_sources:
        raise LabelMapError(
            f"label map{where} names classes {', '.join(map(str, unknown_sources))} that the "
            f"model does not have; its classes are {', '.join(source_classes)}"
        )
    unknown_targets = sorted(
        {str(t) for t in mapping.values() if t is not None and t not in target_classes}
    )
    if unknown_targets:
        raise LabelMapError(
            f"label map{where} maps to {', '.join(unknown_targets)}, which are not target "
            f"classes ({', '.join(target_classes)})"
        )
    reached = set(mapping.values())
    unreached = [name for name in target_classes if name not in reached]
    if unreached:
        raise LabelMapError(
            f"label map{where} maps no source class to target classes {', '.join(unreached)} "
            "(map a source class to each, or leave them out with `drop: [...]`)"
        )
    return LabelMap(
        source_classes=list(source_classes),
        target_classes=list(target_classes),
        mapping={name: mapping[name] for name in source_classes},
        source=source,
        dropped=list(drop),
    )


def load_label_map(
    path: str | Path, source_classes: Sequence[str], target_classes: Sequence[str]
) -> LabelMap:
    """Read a label map YAML (a `mapping:` of source class -> target class or null, and an
    optional `drop:` list of target classes to leave out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        message = f"YAML syntax error in label map {path}: {error}".splitlines()[0]
        raise LabelMapError(message) from None
    if not isinstance(data, dict) or not isinstance(data.get("mapping"), dict):
        raise LabelMapError(f"label map {path} must hold a 'mapping' of source -> target class")
    mapping = {str(key): value for key, value in data["mapping"].items()}
    bad = [
        key for key, value in mapping.items() if value is not None and not isinstance(value, str)
    ]
    if bad:
        raise LabelMapError(f"label map {path}: targets of {', '.join(bad)} must be names or null")
    unknown_keys = sorted(set(data) - {"mapping", "drop"})
    if unknown_keys:
        raise LabelMapError(
            f"label map {path}: unknown keys {unknown_keys} (allowed: mapping, drop)"
        )
    drop = data.get("drop") or []
    if not isinstance(drop, list) or not all(isinstance(name, str) for name in drop):
        raise LabelMapError(f"label map {path}: drop must be a list of target class names")
    return build_label_map(mapping, source_classes, target_classes, str(path), drop)


def select_target_items(items: Sequence[Any], label_map: LabelMap) -> tuple[list[Any], dict]:
    """The target dataset's items without the dropped classes, relabelled to the kept classes'
    order; and {dropped class: number of images left out} (every dropped class, 0 included)."""
    counts = {name: 0 for name in label_map.dropped}
    kept = []
    for item in items:
        if item.class_name in counts:
            counts[item.class_name] += 1
        else:
            kept.append(replace(item, label=label_map.target_classes.index(item.class_name)))
    return kept, counts


def compute_mapped_probabilities(probabilities: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, S) source probabilities x (S, T) 0/1 map -> (N, T) target probabilities.

    Each target column is the sum of its source columns; rows are renormalised to sum to 1
    (dropped source classes remove mass). A row whose mass was all dropped becomes uniform.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != matrix.shape[0]:
        raise LabelMapError(
            f"probabilities of shape {probabilities.shape} do not fit a map of "
            f"{matrix.shape[0]} source classes"
        )
    mapped = probabilities @ matrix
    totals = mapped.sum(axis=1, keepdims=True)
    uniform = np.full_like(mapped, 1.0 / matrix.shape[1])
    return np.where(totals > 0, mapped / np.where(totals > 0, totals, 1.0), uniform)


def evaluate_with_label_map(
    trainer: Any,
    data: Any,
    label_map: LabelMap,
    positive_classes: Sequence[str] = (),
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Metrics of a trained model on another dataset's ImageSet, through the label map.

    trainer: has `class_names` (must equal label_map.source_classes) and
    `predict_probabilities(data) -> (N, S)`; data: an ImageSet labelled in the target classes.
    Adds per-center metrics when the target data has several centers.
    """
    if list(trainer.class_names) != label_map.source_classes:
        raise LabelMapError(
            f"label map {label_map.source or ''} was built for classes "
            f"{label_map.source_classes}, the model has {list(trainer.class_names)}"
        )
    probabilities = compute_mapped_probabilities(
        trainer.predict_probabilities(data), label_map.matrix()
    )
    classes = label_map.target_classes
    metrics = compute_metrics(probabilities, data.labels, classes, positive_classes, ece_bins)
    if len(set(data.centers)) > 1:
        metrics["per_center"] = compute_metrics_by_center(
            probabilities, data.labels, data.centers, classes, positive_classes, ece_bins
        )
    metrics["label_map"] = {name: target for name, target in label_map.mapping.items()}
    return metrics
