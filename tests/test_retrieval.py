"""Retrieval metrics on hand-made features; the evaluation hook on a real run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewclip.config import build_config
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
    centred_gallery, centred_query = centre_features(gallery, query)
    unit = torch.nn.functional.normalize
    mean = unit(gallery, dim=-1).mean(0)
    torch.testing.assert_close(centred_gallery, unit(unit(gallery, dim=-1) - mean, dim=-1))
    torch.testing.assert_close(centred_query, unit(unit(query, dim=-1) - mean, dim=-1))
    assert float(unit(gallery, dim=-1)[0] @ unit(gallery, dim=-1)[1]) > 0.98  # raw: alike
    assert float(centred_gallery[0] @ centred_gallery[1]) == pytest.approx(-1.0, abs=1e-5)
    similarity = (centred_query @ centred_gallery.t())[0]
    assert similarity[0] > 0.99 and similarity[1] < -0.99


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
