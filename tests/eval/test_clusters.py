"""Cluster scores against hand-computed answers, prototype assignment (argmax and Sinkhorn)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from swav.eval.clusters import (PrototypeScores, ari, assign, cluster_metrics, contingency_table,
                                hungarian_accuracy, nmi, purity)


def test_perfect_clustering_with_other_names():
    pred, labels = [7, 7, 3, 3, 5], [0, 0, 1, 1, 2]
    m = cluster_metrics(pred, labels)
    assert m == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 100.0, "hungarian_acc": 100.0,
                               "prototypes_used": 3.0})


def test_one_cluster_for_two_classes():
    pred, labels = [0, 0, 0, 0], [0, 0, 1, 1]
    assert nmi(pred, labels) == 0.0
    assert ari(pred, labels) == 0.0
    assert purity(pred, labels) == 0.5
    assert hungarian_accuracy(pred, labels) == 0.5


def test_hand_computed_case():
    # clusters {a a b} {b c c} over classes a=0, b=1, c=2
    pred, labels = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert contingency_table(pred, labels).tolist() == [[2, 1, 0], [0, 1, 2]]
    # purity: (2 + 2) / 6; Hungarian: 0->a (2), 1->c (2)
    assert purity(pred, labels) == pytest.approx(4 / 6)
    assert hungarian_accuracy(pred, labels) == pytest.approx(4 / 6)
    # ARI: sum C(n_ij, 2) = 2; rows C(3,2)*2 = 6; cols C(2,2)*3 = 3; C(6,2) = 15
    expected = 6 * 3 / 15
    assert ari(pred, labels) == pytest.approx((2 - expected) / ((6 + 3) / 2 - expected))
    # NMI: MI = 2 * (1/3) ln 2; H(clusters) = ln 2, H(classes) = ln 3; arithmetic mean
    assert nmi(pred, labels) == pytest.approx((2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2))


def test_hungarian_with_more_clusters_than_classes():
    # 4 clusters, 2 classes: only two clusters can be matched
    pred, labels = [0, 0, 1, 1, 2, 3], [0, 0, 0, 1, 1, 1]
    # table rows {0: 2}, {0: 1, 1: 1}, {1: 1}, {1: 1}: best one-to-one is 0->0 (2) plus one cluster -> 1 (1)
    assert hungarian_accuracy(pred, labels) == pytest.approx(3 / 6)
    assert purity(pred, labels) == pytest.approx(5 / 6)  # cluster 1 is mixed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_learn(seed):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.6, labels * 3 % 7, rng.integers(0, 9, 200))
    assert nmi(pred, labels) == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-10)
    assert ari(pred, labels) == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-10)


def test_input_errors():
    with pytest.raises(ValueError, match="predictions"):
        cluster_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="no samples"):
        cluster_metrics([], [])


def test_assign_argmax_and_sinkhorn():
    # every image prefers prototype 0; Sinkhorn spreads them: the two with the smallest margin go to 1
    scores = torch.tensor([[0.9, 0.8], [0.9, 0.1], [0.9, 0.85], [0.9, 0.0]])
    proto, score = assign(scores)
    assert proto.tolist() == [0, 0, 0, 0] and torch.allclose(score, torch.full((4,), 0.9))
    proto, score = assign(scores, "sinkhorn")
    assert proto.tolist() == [1, 0, 1, 0]
    assert torch.allclose(score, torch.tensor([0.8, 0.9, 0.85, 0.9]))
    with pytest.raises(ValueError, match="unknown"):
        assign(scores, "kmeans")


def test_prototype_scores_are_cosines_with_normalised_prototypes():
    from swav.models import SwAVModel, create_backbone

    torch.manual_seed(0)
    model = SwAVModel(create_backbone("resnet18", width_per_group=4, in_chans=1, small_stem=True),
                      hidden_mlp=8, feat_dim=4, nmb_prototypes=[5, 3]).eval()
    with torch.no_grad():
        model.prototypes.prototypes1.weight.mul_(3.0)  # not unit-norm: must not change the scores
        x = torch.randn(6, 1, 12, 12)
        s = PrototypeScores(model, head=1)(x)
        z, _ = model(x)
        c = torch.nn.functional.normalize(model.prototypes.prototypes1.weight, dim=1)
    assert s.shape == (6, 3) and torch.allclose(s, z @ c.t(), atol=1e-6)
    assert s.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="head 2"):
        PrototypeScores(model, head=2)
