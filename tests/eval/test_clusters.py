"""Cluster scores against hand-computed answers, prototype assignment (argmax and Sinkhorn)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from swav.eval.clusters import (PrototypeScores, ari, assign, cluster_metrics, contingency_table,
                                hungarian_accuracy, max_weight_matching, nmi, purity)


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


def _brute_force_best(w: np.ndarray) -> float:
    """The largest total weight of a one-to-one matching, by trying every one."""
    n, m = w.shape
    if n <= m:
        return max(sum(w[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return _brute_force_best(w.T)


def _check_matching(w: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    assert len(rows) == len(cols) == min(w.shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)  # one-to-one
    assert (np.diff(rows) > 0).all()  # rows ascending, as scipy returns them


@pytest.mark.parametrize("seed", range(4))
def test_matching_is_the_best_one_to_one_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    for trial in range(60):
        shape = tuple(rng.integers(1, 6, 2))
        w = rng.integers(0, 3 if trial % 2 else 50, shape)  # few values: many ties
        rows, cols = max_weight_matching(w)
        _check_matching(w, rows, cols)
        assert w[rows, cols].sum() == _brute_force_best(w), w


def test_matching_agrees_with_scipy_on_large_and_real_valued_matrices():
    linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = np.random.default_rng(7)
    cases = [rng.integers(0, 40, (300, 300)), rng.integers(0, 5, (120, 1000)), rng.normal(size=(50, 20)),
             rng.normal(size=(20, 50)) * 1e6]
    labels = rng.integers(0, 100, 20000)  # a contingency table: 100 classes over up to 1000 clusters
    pred = np.where(rng.random(20000) < 0.6, labels * 7 % 1000, rng.integers(0, 1000, 20000))
    cases.append(contingency_table(pred, labels))
    for w in cases:
        rows, cols = max_weight_matching(w)
        _check_matching(w, rows, cols)
        r, c = linear_sum_assignment(w, maximize=True)
        assert w[rows, cols].sum() == pytest.approx(w[r, c].sum(), rel=1e-12, abs=0)


def test_matching_input_errors():
    assert [x.tolist() for x in max_weight_matching(np.zeros((0, 3)))] == [[], []]
    with pytest.raises(ValueError, match="2-D"):
        max_weight_matching(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        max_weight_matching(np.array([[1.0, np.nan]]))


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
