"""Every backbone family of the registry, through the one interface (issue 21).

Parametrised over ``swav.models.FAMILIES``: a family is tested here as soon as it registers, with its
own ``example`` (a tiny network). The families whose library is not installed (timm, torchvision in
``.venv``) are skipped here and run in the side environment (``tests/test_side_env.py`` runs this
file there, where a missing library fails instead of skipping).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from swav.config import ModelConfig
from swav.models import (FAMILIES, StateDictMismatchError, SwAVModel, build_backbone, decay_groups, family_of,
                         is_norm)

IN_SIDE_ENV = os.environ.get("SWAV_SIDE_ENV") == "1"
WITH_EXAMPLE = [pytest.param(f, id=f.name.replace(" ", "-")) for f in FAMILIES if f.example is not None]


def settings_of(family, in_chans: int = 1) -> dict:
    arch, settings = family.example
    return dataclasses.asdict(ModelConfig(arch=arch, in_chans=in_chans, **settings))


def build(family, in_chans: int = 1, seed: int = 0) -> nn.Module:
    line = family.missing_extra()
    if line:
        if IN_SIDE_ENV:
            pytest.fail(f"the side environment lacks a library: {line}")
        pytest.skip(f"{line} (runs in the side environment: tests/test_side_env.py)")
    torch.manual_seed(seed)
    return build_backbone(settings_of(family, in_chans))


def test_every_family_but_the_given_ones_has_an_example():
    assert {f.name for f in FAMILIES if f.example is None} == {"registered", "your module"}
    for f in FAMILIES:
        if f.example is not None:
            assert family_of(f.example[0]) is f


@pytest.mark.parametrize("family", WITH_EXAMPLE)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_pooled_features_of_crops_of_two_sizes_through_one_network(family, in_chans):
    """(B, C, H, W) -> (B, num_features) for grey and colour input, crops of two sizes in one
    SwAVModel forward (grouped by size), each crop's rows equal to its forward alone (eval mode)."""
    net = build(family, in_chans)
    assert isinstance(net.num_features, int) and net.num_features > 0
    model = SwAVModel(net, hidden_mlp=16, feat_dim=8, nmb_prototypes=5).eval()
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, in_chans, 24, 24, generator=g) for _ in range(2)] + [torch.randn(3, in_chans, 16, 16,
                                                                                               generator=g)]
    with torch.no_grad():
        feats = model.forward_backbone(crops)
        alone = model.forward_backbone([crops[2]])
    assert feats.shape == (9, net.num_features)
    torch.testing.assert_close(feats[6:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", WITH_EXAMPLE)
def test_export_names_load_back_strictly_and_name_what_does_not_fit(family):
    net, other = build(family, seed=0).eval(), build(family, seed=1).eval()
    sd = family.export_state_dict(net)
    assert sd and not any(k.startswith(("backbone.", "net.")) for k in sd)  # the library's own names
    x = torch.randn(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(net(x), other(x))
        assert family.load_export_state_dict(other, sd, "test") == ([], [])
        assert torch.equal(net(x), other(x))
    first = next(iter(sd))
    with pytest.raises(StateDictMismatchError, match=f"missing keys: {first}"):
        family.load_export_state_dict(other, {k: v for k, v in sd.items() if k != first}, "test")
    with pytest.raises(StateDictMismatchError, match="unexpected keys: stray.weight"):
        family.load_export_state_dict(other, {**sd, "stray.weight": torch.zeros(1)}, "test")


@pytest.mark.parametrize("family", WITH_EXAMPLE)
def test_norms_and_biases_are_found_by_module_kind(family):
    net = build(family)
    decay, no_decay = decay_groups(net, family.no_weight_decay(net))
    assert len(decay) + len(no_decay) == len(list(net.parameters()))
    ids = {id(p) for p in no_decay}
    for mname, module in net.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if is_norm(module) or pname == "bias":
                assert id(p) in ids, f"{mname}.{pname} should not decay"
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight":
                assert id(p) not in ids, f"{mname}.{pname} should decay"
    assert any(is_norm(m) for m in net.modules()), "the example has norm layers to find"


@pytest.mark.parametrize("family", WITH_EXAMPLE)
def test_settings_the_family_does_not_read_are_named(family):
    arch = family.example[0]
    settings = {**settings_of(family), "width_per_group": 16, "small_stem": True}
    problems = family.setting_problems(arch, settings)
    for key in ("width_per_group", "small_stem"):
        assert any(f"model.{key}" in p for p in problems) == (key not in family.reads)
    assert isinstance(family.describe(arch, settings_of(family)), list)
