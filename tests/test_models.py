import pytest
import torch
from torch import nn

from swav.checkpoint import (StateDictMismatchError, load_official_state_dict, model_from_official_state_dict,
                             model_to_official_keys)
from swav.loss import swav_loss
from swav.models import SwAVModel, create_backbone, list_backbones
from swav.models.resnet import GridPool

# torchvision's parameter counts (with the 1000-class fc) and the official SwAV wide models (no fc)
TORCHVISION_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}
SWAV_WIDE_COUNTS = {"resnet50": 23_508_032, "resnet50w2": 93_907_072, "resnet50w4": 375_378_176,
                    "resnet50w5": 586_450_240}
LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
          "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3]}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_parameter_counts_match_torchvision(name):
    with torch.device("meta"):
        assert n_params(create_backbone(name, num_classes=1000)) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize("name", sorted(SWAV_WIDE_COUNTS))
def test_parameter_counts_match_official_swav_without_fc(name):
    with torch.device("meta"):
        assert n_params(create_backbone(name)) == SWAV_WIDE_COUNTS[name]


def torchvision_keys(layers, bottleneck):
    """torchvision's ResNet state-dict names, written out from its naming scheme."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    convs = 3 if bottleneck else 2
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            for c in range(1, convs + 1):
                keys += [p + f"conv{c}.weight"] + [p + f"bn{c}.{s}" for s in bn]
            if b == 0 and (bottleneck or stage > 1):
                keys += [p + "downsample.0.weight"] + [p + f"downsample.1.{s}" for s in bn]
    return set(keys + ["fc.weight", "fc.bias"])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_dict_uses_torchvision_names(name):
    with torch.device("meta"):
        sd = create_backbone(name, num_classes=1000).state_dict()
    assert set(sd) == torchvision_keys(LAYERS[name], bottleneck=name not in ("resnet10", "resnet18", "resnet34"))


def test_resnet50_shapes_match_torchvision():
    with torch.device("meta"):
        sd = create_backbone("resnet50", num_classes=1000).state_dict()
    expected = {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
                "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
                "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k


def test_registry_lists_every_arch():
    assert {"resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50w2", "resnet50w4",
            "resnet50w5"} <= set(list_backbones())
    with pytest.raises(ValueError, match="not a known backbone .*did you mean 'resnet50'"):
        create_backbone("resnet51")


def test_small_stem_keeps_resolution_and_one_channel():
    net = create_backbone("resnet18", small_stem=True, in_chans=1, width_per_group=8)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    fmap = net.forward_features(torch.zeros(2, 1, 28, 28))
    assert fmap.shape == (2, 64, 4, 4)  # 28 -> 28 -> 14 -> 7 -> 4: no stem downsampling
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, net.num_features)


class TinyNet(nn.Module):
    """Any module returning pooled features plugs in."""
    num_features = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_forward_groups_crops_by_resolution():
    backbone = TinyNet()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model = SwAVModel(backbone, hidden_mlp=8, feat_dim=4, nmb_prototypes=5).eval()
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8),
             torch.randn(3, 3, 8, 8)]
    z, s = model(crops)
    assert [tuple(c) for c in calls] == [(6, 3, 16, 16), (9, 3, 8, 8)]
    assert z.shape == (15, 4) and s.shape == (15, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(15))
    # crop-major order: crop v's rows are the same as forwarding crop v alone
    z2, _ = model([crops[3]])
    torch.testing.assert_close(z[9:12], z2)


def train_steps(model, opt, steps, freeze_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    norms = []
    for step in range(steps):
        model.prototypes.normalize_()
        norms.append(model.prototypes.weight.norm(dim=1).clone())
        crops = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2)] + [torch.randn(8, 3, 8, 8, generator=g)]
        z, s = model(crops)
        loss, _ = swav_loss(s, z.detach(), model.prototypes.weight, 8, [0, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze_steps:
            model.prototypes.drop_grad_()
        opt.step()
    return norms


def test_prototypes_unit_norm_each_step_and_frozen_ones_do_not_move():
    torch.manual_seed(0)
    model = SwAVModel(TinyNet(), hidden_mlp=8, feat_dim=4, nmb_prototypes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    protos0 = model.prototypes.weight.detach().clone()
    head0 = model.projection_head[0].weight.detach().clone()
    model.prototypes.normalize_()
    normalized0 = model.prototypes.weight.detach().clone()
    train_steps(model, opt, 3, freeze_steps=3)
    assert not torch.equal(protos0, normalized0)  # initial prototypes were not unit-norm
    # frozen: untouched by SGD, weight decay and momentum (only normalize_'s float rounding remains)
    assert (model.prototypes.weight.detach() - normalized0).abs().max() < 1e-6
    assert not torch.allclose(model.projection_head[0].weight, head0)  # the rest trains
    norms = train_steps(model, opt, 4, freeze_steps=0, seed=1)
    assert (model.prototypes.weight.detach() - normalized0).abs().max() > 1e-3  # now they move
    for n in norms:
        torch.testing.assert_close(n, torch.ones(5))
    assert not torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(5))  # a step leaves the sphere...
    model.prototypes.normalize_()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))  # ...and normalize_ restores it


def small_official_state_dict(nmb=12, prefix="module."):
    torch.manual_seed(0)
    model = SwAVModel(create_backbone("resnet50", width_per_group=8), hidden_mlp=32, feat_dim=8, nmb_prototypes=nmb)
    return model, model_to_official_keys(model.state_dict(), prefix=prefix)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_layout_round_trip(prefix):
    model, sd = small_official_state_dict(prefix=prefix)
    assert "prototypes.weight" in sd or f"{prefix}prototypes.weight" in sd
    loaded = model_from_official_state_dict(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_official_layout_several_heads():
    model, sd = small_official_state_dict(nmb=[7, 5])
    assert "module.prototypes.prototypes1.weight" in sd
    loaded = model_from_official_state_dict(sd)
    assert loaded.prototypes.nmb_prototypes == [7, 5]


def test_official_load_is_strict_and_lists_keys():
    model, sd = small_official_state_dict()
    broken = dict(sd)
    del broken["module.layer2.0.conv1.weight"]
    broken["module.extra.weight"] = torch.zeros(1)
    broken["module.projection_head.3.weight"] = torch.zeros(9, 32)
    with pytest.raises(StateDictMismatchError) as err:
        load_official_state_dict(model, broken)
    msg = str(err.value)
    assert "layer2.0.conv1.weight" in msg and "extra.weight" in msg and "projection_head.3.weight (9, 32)" in msg


@pytest.mark.parametrize("arch", ["resnet10", "resnet50"])
def test_pool_size_keeps_a_grid_of_the_last_map_and_the_torchvision_weights(arch):
    """pool_size=2 flattens a 2x2 average-pooling grid of the last feature map (C*4 features, channel
    major as torchvision's flatten after AdaptiveAvgPool2d(2)); the weights are those of pool_size=1,
    key for key and shape for shape, so torchvision's ResNets still load them."""
    kw = dict(small_stem=True, in_chans=1, width_per_group=16)
    g1, g2 = create_backbone(arch, **kw).eval(), create_backbone(arch, pool_size=2, **kw).eval()
    assert g2.num_features == 4 * g1.num_features
    assert {k: v.shape for k, v in g1.state_dict().items()} == {k: v.shape for k, v in g2.state_dict().items()}
    g2.load_state_dict(g1.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fmap = g2.forward_features(x)  # (3, C, 4, 4) for 28 px
        out = g2(x)
        assert out.shape == (3, g2.num_features)
        cells = [fmap[:, :, :2, :2], fmap[:, :, :2, 2:], fmap[:, :, 2:, :2], fmap[:, :, 2:, 2:]]
        want = torch.stack([c.mean((2, 3)) for c in cells], dim=2).flatten(1)  # (B, C*4), channel major
        # float32 sums of up to 16 terms in another order: a few units of rounding of the largest value
        tol = dict(rtol=0, atol=16 * torch.finfo(torch.float32).eps * float(out.abs().max()))
        torch.testing.assert_close(out, want, **tol)
        # the mean of the four cells of a channel is its global average: pool_size=1's feature
        torch.testing.assert_close(out.view(3, -1, 4).mean(2), g1(x), **tol)


@pytest.mark.parametrize("shape,p", [((3, 8, 4, 4), 4), ((3, 8, 2, 2), 4), ((3, 8, 1, 1), 4), ((3, 8, 2, 1), 4),
                                     ((3, 8, 1, 2), 2), ((3, 8, 7, 7), 1), ((3, 8, 7, 7), 4), ((3, 8, 3, 3), 4),
                                     ((3, 8, 8, 8), 4), ((3, 8, 1, 1), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grid_pool_equals_adaptive_average_pooling(shape, p, channels_last):
    """GridPool's shortcuts (a map already p x p; sides dividing p, replicated) give exactly the
    values of nn.AdaptiveAvgPool2d(p), torchvision's avgpool, bit for bit (each grid cell there is
    one map cell, copied), and its gradients up to the order of a sum of at most 16 terms (seen
    bit for bit); other sizes go through adaptive pooling itself."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = nn.AdaptiveAvgPool2d(p)(x1), GridPool(p)(x2)
    assert got.shape == want.shape == (shape[0], shape[1], p, p)
    assert torch.equal(got, want)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=16 * torch.finfo(torch.float32).eps * float(x1.grad.abs().max()))


def test_pooled_grid_survives_the_official_layout():
    """An official-layout file of a pool_size=2 model loads back as pool_size=2: the grid is read off
    the projection head's input width (C * 4), and the features are the same."""
    model = SwAVModel(create_backbone("resnet10", small_stem=True, in_chans=1, width_per_group=16, pool_size=2),
                      hidden_mlp=32, feat_dim=16, nmb_prototypes=10).eval()
    back = model_from_official_state_dict(model_to_official_keys(model.state_dict(), prefix="module.")).eval()
    assert back.backbone.avgpool.pool_size == 2 and back.backbone.num_features == 512
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back.backbone(x), model.backbone(x), rtol=0, atol=0)


def test_head_precision_under_bf16_autocast():
    """Under bf16 autocast only the head's first layer (F -> hidden) runs in bf16; z and the scores,
    which Sinkhorn divides by eps, stay float32. Their difference to float32 is the bf16 rounding of
    the 11 convolutions and the first head layer (half a bf16 unit, 2**-8, relative each), which
    the normalisations keep near that scale: seen 0.2-0.75 units here; the bound, 4 units of
    |z| <= 1 and of the scores (|c_k| < 1 at this init), leaves room for other CPUs' rounding."""
    torch.manual_seed(0)
    model = SwAVModel(create_backbone("resnet10", width_per_group=8, in_chans=1, small_stem=True, pool_size=2),
                      hidden_mlp=64, feat_dim=16, nmb_prototypes=10).eval()
    seen = {}
    model.projection_head[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o.dtype))
    model.projection_head[3].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o.dtype))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        z32, s32 = model([x])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16, s16 = model([x])
    assert seen == {"first": torch.bfloat16, "last": torch.float32}
    assert z16.dtype == s16.dtype == torch.float32
    eps = 2.0 ** -8
    assert (z16 - z32).abs().max() < 4 * eps
    assert (s16 - s32).abs().max() < 4 * eps
    assert (z16 - z32).abs().max() > 0  # the backbone and the first layer did run in bf16


@pytest.mark.parametrize("arch", ["resnet10", "resnet50"])
def test_zero_init_residual_starts_each_block_as_its_shortcut(arch):
    """``model.zero_init_residual=true``: every residual branch's last BatchNorm starts at gamma 0,
    so each block computes relu(shortcut(x)) at init; the default keeps the official init (gamma 1,
    the branch adds to the output). Built through the config, as the trainer builds it."""
    from swav.build import build_model
    from swav.config import make_config

    def built(flag):
        cfg = make_config("smoke", overrides=[f"model.arch={arch}", f"model.zero_init_residual={flag}"])
        torch.manual_seed(0)
        return build_model(cfg).backbone.eval()

    x = torch.randn(3, 1, 28, 28)
    for flag in (True, False):
        net = built(flag)
        h = net.relu(net.bn1(net.conv1(x)))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
                assert torch.all(last_bn.weight == (0.0 if flag else 1.0))
                shortcut = h if block.downsample is None else block.downsample(h)
                out = block(h)
                if flag:
                    torch.testing.assert_close(out, torch.relu(shortcut), rtol=0, atol=0)
                else:
                    assert not torch.allclose(out, torch.relu(shortcut))
                h = out
