"""Retrieval metrics on hand-made features; the evaluation hook on a real run."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewclip.config import ConfigError, build_config
from fewclip.retrieval import (
    centre_features,
    compute_majority_vote,
    compute_retrieval_metrics,
    evaluate_retrieval,
)
from fewclip.run import execute_run


def test_centring_removes_the_shared_component_before_cosine():
    shared = torch.tensor([10.0, 0.0, 0.0])
    offset = torch.tensor([0.0, 1.0, 0.0])
    gallery = torch.stack([shared + offset, shared - offset])
    query = (shared + 0.5 * offset)[None]
    unit = torch.nn.functional.normalize
    for order in ("centre_then_normalise", "normalise_then_centre"):
        centred_gallery, centred_query = centre_features(gallery, query, order)
        assert float(unit(gallery, dim=-1)[0] @ unit(gallery, dim=-1)[1]) > 0.98  # raw: alike
        assert float(centred_gallery[0] @ centred_gallery[1]) == pytest.approx(-1.0, abs=1e-5)
        similarity = (centred_query @ centred_gallery.t())[0]
        assert similarity[0] > 0.99 and similarity[1] < -0.99
    first = unit(gallery, dim=-1)  # normalise_then_centre: unit rows, then the unit mean
    centred_gallery, centred_query = centre_features(gallery, query, "normalise_then_centre")
    torch.testing.assert_close(centred_gallery, unit(first - first.mean(0), dim=-1))
    torch.testing.assert_close(centred_query, unit(unit(query, dim=-1) - first.mean(0), dim=-1))


# Non-unit features (raw CLS tokens): the gallery mean of raw vectors differs from that of unit
# vectors, so the two orders rank differently. Rows: (x, y) with very different norms.
RAW_GALLERY = torch.tensor([[10.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-1.0, 0.2]])
RAW_QUERIES = torch.tensor([[2.0, 1.9], [0.2, 0.1], [-0.5, 2.0]])


def source_retrieval(query_features, gallery_features, gallery_labels, query_labels):
    """CervixFM downstream/utils/retrieval.py:41-68 + metrics.py:141-169, re-implemented:
    centre by the key mean, L2, nearest by L2 distance (faiss IndexFlatL2), top-10, Counter."""
    mean = gallery_features.mean(dim=0, keepdim=True)
    keys = torch.nn.functional.normalize(gallery_features - mean, dim=-1, p=2)
    queries = torch.nn.functional.normalize(query_features - mean, dim=-1, p=2)
    rows = []
    for query, label in zip(queries, query_labels):
        distances = ((keys - query) ** 2).sum(dim=1)
        nearest = [int(i) for i in torch.argsort(distances, stable=True)[:10]]
        labels = [int(gallery_labels[i]) for i in nearest]
        rows.append(
            [
                int(label == labels[0]),
                int(label in labels[:3]),
                int(label in labels[:5]),
                int(label in labels[:10]),
                int(label == Counter(labels[:5]).most_common(1)[0][0]),
                int(label == Counter(labels[:10]).most_common(1)[0][0]),
            ]
        )
    return np.array(rows).mean(axis=0)


def test_centre_then_normalise_is_the_source_on_non_unit_features():
    centred_gallery, centred_query = centre_features(RAW_GALLERY, RAW_QUERIES)
    mean = RAW_GALLERY.mean(0)
    torch.testing.assert_close(
        centred_gallery, (RAW_GALLERY - mean) / (RAW_GALLERY - mean).norm(dim=1, keepdim=True)
    )
    torch.testing.assert_close(
        centred_query, (RAW_QUERIES - mean) / (RAW_QUERIES - mean).norm(dim=1, keepdim=True)
    )
    source_order = torch.argsort(centred_query @ centred_gallery.t(), dim=1, descending=True)
    other_gallery, other_query = centre_features(RAW_GALLERY, RAW_QUERIES, "normalise_then_centre")
    other_order = torch.argsort(other_query @ other_gallery.t(), dim=1, descending=True)
    assert not torch.equal(source_order[:, 0], other_order[:, 0])  # top-1 differs
    with pytest.raises(
        ValueError,
        match="EVAL.RETRIEVAL_NORMALISE 'centre'.*centre_then_normalise, normalise_then_centre",
    ):
        centre_features(RAW_GALLERY, RAW_QUERIES, "centre")


def test_metrics_equal_the_source_top_k_and_majority_vote():
    generator = torch.Generator().manual_seed(5)
    scale = torch.rand(40, 1, generator=generator) * 20 + 0.1  # far from unit length
    gallery = (torch.randn(40, 6, generator=generator) + 3.0) * scale
    queries = (torch.randn(25, 6, generator=generator) + 3.0) * 5.0
    gallery_labels = (torch.arange(40) % 3).numpy()
    query_labels = torch.randint(0, 3, (25,), generator=generator).numpy()
    metrics = compute_retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, (1, 3, 5, 10)
    )
    expected = source_retrieval(queries, gallery, gallery_labels, query_labels)
    got = [metrics[f"hit_rate@{k}"] for k in (1, 3, 5, 10)]
    got += [metrics["majority_vote_accuracy@5"], metrics["majority_vote_accuracy@10"]]
    np.testing.assert_allclose(got, expected)
    swapped = compute_retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, (1, 3, 5, 10), "normalise_then_centre"
    )
    assert any(swapped[f"hit_rate@{k}"] != metrics[f"hit_rate@{k}"] for k in (1, 3, 5)) or any(
        swapped[f"majority_vote_accuracy@{k}"] != metrics[f"majority_vote_accuracy@{k}"]
        for k in (1, 3, 5, 10)
    )


def test_majority_vote_ties_match_counter_most_common():
    generator = np.random.default_rng(3)
    neighbours = generator.integers(0, 3, (200, 4))  # many ties among 4 votes over 3 classes
    expected = [Counter(row.tolist()).most_common(1)[0][0] for row in neighbours]
    np.testing.assert_array_equal(compute_majority_vote(neighbours, 3), expected)


def test_bad_normalise_order_fails_at_config_time():
    with pytest.raises(ConfigError, match="EVAL.RETRIEVAL_NORMALISE 'unit'.*centre_then_normalise"):
        build_config(None, "configs/datasets/synthetic.yaml", ["EVAL.RETRIEVAL_NORMALISE", "unit"])


def test_majority_vote_breaks_ties_by_the_nearest_member():
    neighbours = np.array([[1, 2, 2, 1], [2, 1, 1, 0], [0, 0, 2, 2], [3, 3, 3, 1]])
    np.testing.assert_array_equal(compute_majority_vote(neighbours, 4), [1, 1, 0, 3])


def test_hit_rate_and_majority_vote_on_hand_made_features():
    # gallery on a circle: class 0 at 0 and 20 degrees, class 1 at 90, class 2 at 180 and 200
    angles = np.deg2rad([0, 20, 90, 180, 200])
    gallery = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    gallery_labels = np.array([0, 0, 1, 2, 2])
    queries = torch.tensor([[1.0, 0.05], [0.2, 1.0], [-1.0, -0.1]])
    query_labels = np.array([0, 2, 2])  # the second query sits next to class 1
    # centring shifts by the gallery mean; check the resulting order explicitly
    centred_gallery, centred_queries = centre_features(gallery, queries)
    order = torch.argsort(centred_queries @ centred_gallery.t(), dim=1, descending=True).numpy()
    metrics = compute_retrieval_metrics(queries, query_labels, gallery, gallery_labels, (1, 3, 10))
    for k in (1, 3, 10):
        neighbours = gallery_labels[order[:, :k]]
        hits = [label in row for label, row in zip(query_labels, neighbours)]
        votes = [np.bincount(row, minlength=3).argmax() for row in neighbours]
        assert metrics[f"hit_rate@{k}"] == pytest.approx(np.mean(hits))
        if k != 10:  # k=10 is capped at the 5 gallery images (checked below)
            assert metrics[f"majority_vote_accuracy@{k}"] == pytest.approx(
                np.mean(np.array(votes) == query_labels)
            )
    assert metrics["hit_rate@1"] == pytest.approx(2 / 3)  # the second query misses at k=1
    assert metrics["hit_rate@10"] == 1.0 and metrics["gallery_size"] == 5
    assert metrics["majority_vote_accuracy@10"] == pytest.approx(
        np.mean(compute_majority_vote(gallery_labels[order], 3) == query_labels)
    )
    balanced = np.mean(
        [
            np.mean((compute_majority_vote(gallery_labels[order[:, :1]], 3) == 0)[[0]]),
            np.mean((compute_majority_vote(gallery_labels[order[:, :1]], 3) == 2)[[1, 2]]),
        ]
    )
    assert metrics["majority_vote_balanced_accuracy@1"] == pytest.approx(balanced)
    with pytest.raises(ValueError, match="EVAL.RETRIEVAL"):
        compute_retrieval_metrics(queries, query_labels, gallery, gallery_labels, (0,))


def test_trainer_without_image_features_gives_no_retrieval():
    trainer = SimpleNamespace(frozen_image_encoder=False)
    data = SimpleNamespace(labels=np.zeros(2))
    assert evaluate_retrieval(trainer, data, data, (1,)) is None


def test_retrieval_hook_reports_for_test_and_target_sets_only_when_asked(fast_opts):
    recipe, data = "configs/trainers/zeroshot.yaml", "configs/datasets/synthetic.yaml"
    asked = execute_run(build_config(recipe, data, [*fast_opts, "EVAL.RETRIEVAL", "1,5"]))
    assert asked["status"] == "complete", asked.get("error")
    retrieval = asked["metrics"]["test"]["retrieval"]
    assert set(retrieval) == {
        "gallery_size",
        *(f"{name}@{k}" for k in (1, 5) for name in ("hit_rate", "majority_vote_accuracy",
                                                      "majority_vote_balanced_accuracy")),
    }  # fmt: skip
    assert all("retrieval" in metrics for metrics in asked["metrics"]["targets"].values())
    opts = [*fast_opts, "OUTPUT_DIR", fast_opts[1] + "_plain"]
    plain = execute_run(build_config(recipe, data, opts))
    assert "retrieval" not in plain["metrics"]["test"]
