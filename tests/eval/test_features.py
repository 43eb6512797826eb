"""recompute_batchnorm: the running statistics become the plain average over the batches given."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from swav.eval.features import recompute_batchnorm


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # training statistics far from those of the batches below
        for bn in (m[1], m[4]):
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(7.0)
    return m.eval()


def _batches(sizes=(8, 8, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [SimpleNamespace(images=torch.randint(0, 256, (n, 1, 9, 9), dtype=torch.uint8, generator=g),
                            sizes=torch.full((n, 2), 9)) for n in sizes]


def _to_float(images, sizes):
    return images.float() / 255.0


def test_recompute_batchnorm_gives_the_plain_average_over_batches():
    model, batches = _model(), _batches()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    # expected: each BatchNorm's input in train mode (batch statistics), averaged over the 3 batches
    ref, inputs = copy.deepcopy(model).train(), {1: [], 4: []}
    for i in inputs:
        ref[i].register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].detach()))
    with torch.no_grad():
        for b in batches:
            ref(_to_float(b.images, b.sizes))

    assert recompute_batchnorm(model, batches, _to_float, "cpu") == 21
    for i, xs in inputs.items():
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        # float32 averages of 3 terms: a few ulps, far below the 5.0 / 7.0 left behind on failure
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-5, atol=1e-6)
        assert model[i].momentum == 0.1 and int(model[i].num_batches_tracked) == 3
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), f"{k} changed"


def test_recompute_batchnorm_keeps_the_old_statistics_when_it_fails():
    model = _model().train()

    def failing():
        yield from _batches((8,))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recompute_batchnorm(model, failing(), _to_float, "cpu")
    for i in (1, 4):
        assert torch.all(model[i].running_mean == 5.0) and torch.all(model[i].running_var == 7.0)
        assert model[i].momentum == 0.1
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        recompute_batchnorm(model, [], _to_float, "cpu")
    assert torch.all(model[1].running_mean == 5.0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_batchnorm(nn.Linear(2, 2), [], _to_float, "cpu")
