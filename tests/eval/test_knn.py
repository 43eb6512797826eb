import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from swav.eval.features import extract_features
from swav.eval.knn import knn_accuracy, knn_predict

# Four training points in 2-D.  For the query (1, 0) the cosine similarities are
# a: 1, c: 1/sqrt(2), b: 0, d: -1 (c is not unit length: normalised inside).
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # a, b, c, d
LABELS = torch.tensor([0, 1, 1, 2])
Q = torch.tensor([[2.0, 0.0]])
E = math.e
R = math.exp(1 / math.sqrt(2))


@pytest.mark.parametrize(
    "k, expect",
    [
        (1, [E, 0.0, 0.0]),
        (2, [E, R, 0.0]),  # class 0 wins
        (3, [E, R + 1.0, 0.0]),  # b (sim 0, weight e^0 = 1) tips it to class 1
        (4, [E, R + 1.0, 1 / E]),
        (10, [E, R + 1.0, 1 / E]),  # k > N: all four neighbours
    ],
)
def test_knn_scores_by_hand_temperature_one(k, expect):
    scores = knn_predict(TRAIN, LABELS, Q, num_classes=3, k=k, temperature=1.0)
    assert scores.shape == (1, 3) and scores.dtype == torch.float32
    assert torch.allclose(scores, torch.tensor([expect]), rtol=1e-5, atol=1e-6)


def test_knn_default_temperature():
    # T = 0.07: weights exp(1/0.07) for a, exp(0.7071/0.07) for c, exp(0) for b
    scores = knn_predict(TRAIN, LABELS, Q, num_classes=3, k=3)
    expect = torch.tensor([[math.exp(1 / 0.07), math.exp(1 / math.sqrt(2) / 0.07) + 1.0, 0.0]])
    assert torch.allclose(scores, expect, rtol=1e-4)
    assert scores.argmax(1).item() == 0


def test_knn_accuracy_by_hand():
    test = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test_labels = torch.tensor([1, 1])
    # query 1 predicts class 0 with k=2 and class 1 with k=3 (T=1, see above);
    # query 2: nearest are b (1) and c (0.71), both class 1, for any k.
    acc = knn_accuracy(TRAIN, LABELS, test, test_labels, num_classes=3, ks=(2, 3), temperature=1.0)
    assert acc == {"knn_top1@2": 50.0, "knn_top5@2": 100.0, "knn_top1@3": 100.0, "knn_top5@3": 100.0}


def test_knn_accuracy_k_larger_than_n_is_clipped_with_note():
    test = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    acc = knn_accuracy(TRAIN, LABELS, test, torch.tensor([1, 1]), 3, ks=(2, 10), temperature=1.0)
    assert acc["knn_top1@10"] == 100.0  # k=4: class 1 wins for both queries
    assert "k=10" in acc["note"] and "4 training samples" in acc["note"]
    assert "note" not in knn_accuracy(TRAIN, LABELS, test, torch.tensor([1, 1]), 3, ks=(2,))


def test_vote_tie_goes_to_lower_class():
    train = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    labels = torch.tensor([1, 0])
    q = torch.tensor([[0.0, 1.0]])  # equally similar to both
    scores = knn_predict(train, labels, q, num_classes=2, k=2)
    assert scores[0, 0] == scores[0, 1]
    for true, top1 in ((0, 100.0), (1, 0.0)):
        acc = knn_accuracy(train, labels, q, torch.tensor([true]), 2, ks=(2,))
        assert acc["knn_top1@2"] == top1 and acc["knn_top5@2"] == 100.0  # 2 classes < 5


@pytest.mark.parametrize("true, top5", [(2, 100.0), (4, 100.0), (5, 0.0), (6, 0.0), (1, 100.0)])
def test_top5_with_zero_score_ties(true, top5):
    # k=2 neighbours vote for classes 0 and 1; classes 2..6 all score 0 and rank by index:
    # class c >= 2 has rank 2 + (c - 2), so classes 2, 3, 4 are in the top 5 and 5, 6 are not.
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 6])
    acc = knn_accuracy(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([true]), 7, ks=(2,))
    assert acc["knn_top5@2"] == top5
    assert acc["knn_top1@2"] == 0.0


def test_chunking_matches_unchunked():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    test = torch.randn(37, 8, generator=g)
    test_labels = torch.randint(0, 5, (37,), generator=g)
    full = knn_predict(train, labels, test, 5, k=7, chunk_size=1024)
    for chunk in (1, 4, 36):
        # same neighbours and votes; the matmul kernel may differ with the chunk shape (gemv for 1 row)
        assert torch.allclose(knn_predict(train, labels, test, 5, k=7, chunk_size=chunk), full, rtol=1e-5)
        assert knn_accuracy(train, labels, test, test_labels, 5, ks=(7, 20), chunk_size=chunk) == knn_accuracy(
            train, labels, test, test_labels, 5, ks=(7, 20)
        )


def test_knn_input_errors():
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(TRAIN, LABELS, Q, num_classes=2)
    with pytest.raises(ValueError, match="feature sizes"):
        knn_predict(TRAIN, LABELS, torch.zeros(1, 3), num_classes=3)
    with pytest.raises(ValueError, match="k must"):
        knn_predict(TRAIN, LABELS, Q, num_classes=3, k=0)


# ------------------------------------------------------------------ features


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2 * 2 * 2, 3)
        self.drop = nn.Dropout(0.9)  # would make outputs random in train mode

    def forward(self, x):
        return self.drop(self.lin(x.flatten(1)))


def _batches(images, labels, order, batch_size):
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield SimpleNamespace(
            images=images[idx],
            sizes=torch.full((len(idx), 2), 2, dtype=torch.int64),
            labels=labels[idx],
            indices=idx.clone(),
        )


@pytest.mark.parametrize("train_mode", [True, False])
def test_extract_features_ordered_and_mode_restored(train_mode):
    torch.manual_seed(0)
    model = Flat()
    model.train(train_mode)
    images = torch.randint(0, 256, (7, 2, 2, 2), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    order = torch.tensor([4, 0, 6, 2, 5, 1, 3])  # shuffled, as a sampler would
    seen = []

    def transform(imgs, sizes):
        assert imgs.dtype == torch.uint8 and sizes.shape == (imgs.shape[0], 2)
        seen.append(imgs.shape[0])
        return imgs.float() / 255

    feats, labs, idx = extract_features(model, _batches(images, labels, order, 3), transform, "cpu")
    assert model.training == train_mode
    assert seen == [3, 3, 1]
    assert torch.equal(idx, torch.arange(7)) and torch.equal(labs, labels)
    assert feats.dtype == torch.float32 and labs.dtype == torch.int64 and idx.dtype == torch.int64
    with torch.no_grad():
        expect = model.lin((images.float() / 255).flatten(1))
    assert torch.allclose(feats, expect, atol=1e-6)
    # ordinary tensors: usable to train a linear probe
    assert not feats.is_inference() and not feats.requires_grad
    nn.Linear(3, 2)(feats).sum().backward()


def test_extract_features_restores_mode_on_error_and_checks_shape():
    model = nn.Sequential(nn.Conv2d(2, 3, 1))  # returns (N, 3, H, W): not pooled
    model.train()
    batch = next(_batches(torch.zeros(2, 2, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64),
                          torch.arange(2), 2))
    with pytest.raises(ValueError, match="pooled"):
        extract_features(model, [batch], lambda x, s: x.float(), "cpu")
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [], lambda x, s: x.float(), "cpu")


def test_extract_features_amp_and_channels_last():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randint(0, 256, (4, 2, 2, 2), dtype=torch.uint8)
    batches = list(_batches(images, torch.arange(4), torch.tensor([3, 2, 1, 0]), 2))
    feats, _, idx = extract_features(
        model, batches, lambda x, s: x.float() / 255, "cpu", channels_last=True, amp_dtype=torch.bfloat16
    )
    assert feats.dtype == torch.float32 and feats.shape == (4, 4) and torch.equal(idx, torch.arange(4))
    with torch.no_grad():
        expect = model(images.float() / 255)
    assert torch.allclose(feats, expect, atol=0.05)
