"""Weight files: official SwAV releases (built here from the documented key layout), torchvision
ResNet state dicts, wrong files, pickled objects, and the exports."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swav.checkpoint import CheckpointError, StateDictMismatchError
from swav.eval.weights import WeightsError, backbone_state_dict, detect_kind, export_weights, load_weights

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------ official key layout
def _bn(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


def official_layout(width: int = 8, widen: int = 1, hidden: int = 32, feat: int = 8, prototypes=20) -> dict:
    """Key -> shape of an official SwAV ResNet-50 file, from the rules of SWAV_REFERENCE.md: the stem
    has W*widen channels, stage s has planes W*widen*2^s, a bottleneck's inner width is
    int(planes * W / 64) and its output planes * 4; projection_head.{0,1,3}; prototypes."""
    base = width * widen
    shapes = {"conv1.weight": (base, 3, 7, 7), **_bn("bn1", base)}
    inplanes = base
    for s, n in enumerate((3, 4, 6, 3)):
        planes = base * 2 ** s
        inner = int(planes * width / 64)
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (inner, inplanes, 1, 1)
            shapes.update(_bn(f"{p}.bn1", inner))
            shapes[f"{p}.conv2.weight"] = (inner, inner, 3, 3)
            shapes.update(_bn(f"{p}.bn2", inner))
            shapes[f"{p}.conv3.weight"] = (planes * 4, inner, 1, 1)
            shapes.update(_bn(f"{p}.bn3", planes * 4))
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    shapes["projection_head.0.weight"] = (hidden, inplanes)
    shapes["projection_head.0.bias"] = (hidden,)
    shapes.update(_bn("projection_head.1", hidden))
    shapes["projection_head.3.weight"] = (feat, hidden)
    shapes["projection_head.3.bias"] = (feat,)
    if isinstance(prototypes, list):
        for i, k in enumerate(prototypes):
            shapes[f"prototypes.prototypes{i}.weight"] = (k, feat)
    else:
        shapes["prototypes.weight"] = (prototypes, feat)
    return shapes


def fake_official(prefix: str = "module.", seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_layout(**kw).items():
        if k.endswith("num_batches_tracked"):
            sd[prefix + k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[prefix + k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[prefix + k] = torch.randn(shape, generator=g)
    return sd


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def official_names(model_sd):
    return {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in model_sd.items()}


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("widen, prototypes", [(1, 20), (2, [12, 5])])
def test_import_fake_official_release(tmp_path, prefix, widen, prototypes):
    sd = fake_official(prefix, width=8 if widen == 1 else 16, widen=widen, prototypes=prototypes)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(sd, path)
    w = load_weights(path)
    assert w.kind == "official" and w.model is not None and w.config is None and w.run_dir is None
    assert w.resnet_kwargs["layers"] == [3, 4, 6, 3] and w.resnet_kwargs["widen"] == widen
    assert_same(official_names(w.model.state_dict()), {k[len(prefix):]: v for k, v in sd.items()})
    if isinstance(prototypes, list):
        assert w.model.prototypes.nmb_prototypes == prototypes
    # the same architecture at initialisation: same keys and shapes, other values
    fresh = w.fresh()
    fsd = fresh.model.state_dict()
    assert fsd.keys() == w.model.state_dict().keys()
    assert not torch.equal(fsd["backbone.conv1.weight"], w.model.state_dict()["backbone.conv1.weight"])


def test_official_training_checkpoint_and_old_files_without_counters(tmp_path):
    sd = fake_official()
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 3, "state_dict": no_counters}, tmp_path / "ckp.pth")
    w = load_weights(tmp_path / "ckp.pth")
    assert w.kind == "official"
    assert int(w.model.state_dict()["backbone.bn1.num_batches_tracked"]) == 0


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_official_file_missing_keys_are_listed(tmp_path):
    sd = fake_official()
    del sd["module.layer2.0.bn1.running_mean"], sd["module.projection_head.3.bias"]
    torch.save(sd, tmp_path / "f.pt")
    with pytest.raises(StateDictMismatchError) as ei:
        load_weights(tmp_path / "f.pt")
    assert set(ei.value.missing) == {"layer2.0.bn1.running_mean", "projection_head.3.bias"}
    assert "layer2.0.bn1.running_mean" in _message(ei) and "projection_head.3.bias" in _message(ei)


def test_official_file_other_shapes_and_extra_keys_are_listed(tmp_path):
    sd = fake_official()
    sd["module.layer3.1.conv2.weight"] = torch.zeros(5, 5, 3, 3)
    sd["module.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "f.pt")
    with pytest.raises(StateDictMismatchError) as ei:
        load_weights(tmp_path / "f.pt")
    msg = _message(ei)
    assert "layer3.1.conv2.weight (5, 5, 3, 3)" in msg and "extra.weight" in msg
    assert ei.value.unexpected == ["extra.weight"]


def test_non_resnet_dict_is_refused_with_what_was_found(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, tmp_path / "vit.pt")
    with pytest.raises(WeightsError) as ei:
        load_weights(tmp_path / "vit.pt")
    msg = _message(ei)
    assert "'encoder.weight'" in msg and "'decoder.bias'" in msg and "2 entries" in msg
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="found a list"):
        load_weights(tmp_path / "list.pt")


def _torchvision_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / f"torchvision_{name}_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition(" ")
        rows.append((key, tuple(int(s) for s in shape.split(",") if s)))
    return rows


@pytest.mark.parametrize("name, arch", [("resnet18", "resnet18"), ("resnet50", "resnet50")])
def test_torchvision_file_imports_and_exports_torchvision_keys(tmp_path, name, arch):
    """A torchvision state dict (recorded key names and shapes, with fc) loads strictly; the export
    has exactly torchvision's keys and shapes except fc, and loads back to identical tensors."""
    layout = _torchvision_layout(name)
    # cheap distinct values: tensor i is filled with i / 1000
    sd = {k: torch.full(shape, i / 1000.0) if shape else torch.tensor(i) for i, (k, shape) in enumerate(layout)}
    torch.save(sd, tmp_path / f"{name}.pth")
    w = load_weights(tmp_path / f"{name}.pth")
    assert w.kind == "torchvision" and w.model is None
    formats = [("torchvision", "tv.pt")] + ([("safetensors", "tv.safetensors")] if name == "resnet18" else [])
    for fmt, fname in formats:
        out = export_weights(w, fmt, tmp_path / fname)
        if fmt == "torchvision":
            exported = torch.load(out, weights_only=True)
        else:
            from safetensors.torch import load_file
            exported = load_file(out)
        want = [(k, s) for k, s in layout if not k.startswith("fc.")]
        got = [(k, tuple(v.shape)) for k, v in exported.items()]
        if fmt == "torchvision":
            assert got == want  # names, shapes and state-dict order
        else:
            assert sorted(got) == sorted(want)  # safetensors stores the keys sorted
        assert_same(exported, {k: v for k, v in sd.items() if not k.startswith("fc.")})
        again = load_weights(out)
        assert again.kind == "torchvision"
        assert_same(again.backbone.state_dict(), w.backbone.state_dict())


def test_torchvision_file_with_a_wrong_shape_lists_it(tmp_path):
    sd = {k: (torch.tensor(0) if not s else torch.zeros(s)) for k, s in _torchvision_layout("resnet18")}
    sd["layer4.1.bn2.running_var"] = torch.zeros(7)
    del sd["layer2.0.downsample.0.weight"]
    torch.save(sd, tmp_path / "r18.pt")
    with pytest.raises(StateDictMismatchError) as ei:
        load_weights(tmp_path / "r18.pt")
    assert "layer4.1.bn2.running_var (7,)" in _message(ei)
    assert ei.value.missing == ["layer2.0.downsample.0.weight"]


@pytest.mark.parametrize("fmt", ["official", "torchvision", "safetensors"])
def test_export_of_official_reimports_identically(tmp_path, fmt):
    torch.save(fake_official(), tmp_path / "rel.pt")
    w = load_weights(tmp_path / "rel.pt")
    out = export_weights(w, fmt, tmp_path / ("out.safetensors" if fmt == "safetensors" else "out.pt"))
    again = load_weights(out)
    assert_same(again.backbone.state_dict(), w.backbone.state_dict())
    if fmt == "official":
        raw = torch.load(out, weights_only=True)
        assert all(k.startswith("module.") for k in raw)
        assert set(raw) == set(fake_official())
        assert again.kind == "official"
        assert_same(again.model.state_dict(), w.model.state_dict())
    else:
        assert again.kind == "torchvision"
    assert_same(backbone_state_dict(again), backbone_state_dict(w))


def test_backbone_only_file_cannot_be_exported_as_official(tmp_path):
    sd = {k: (torch.tensor(0) if not s else torch.zeros(s)) for k, s in _torchvision_layout("resnet18")}
    torch.save(sd, tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="backbone only"):
        export_weights(load_weights(tmp_path / "r18.pt"), "official", tmp_path / "x.pt")


class Boobytrap:
    """Unpickling this object would create ``marker`` (standing in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    sd = fake_official()
    sd["module.payload"] = Boobytrap(marker)
    torch.save(sd, tmp_path / "evil.pt")
    torch.save({"format": "swav-run/1", "config": {}, "model": {}, "x": Boobytrap(marker)}, tmp_path / "evil_run.pt")
    for name in ("evil.pt", "evil_run.pt"):
        with pytest.raises(CheckpointError, match="refused") as ei:
            load_weights(tmp_path / name)
        assert "only tensors and plain containers" in _message(ei)
    assert not marker.exists()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="without a checkpoint.pt"):
        load_weights(tmp_path)


def test_detect_kind():
    sd = fake_official()
    assert detect_kind(sd)[0] == "official"
    assert detect_kind({"format": "swav-run/1", "model": {}, "config": {}})[0] == "run"
    body = {k[len("module."):]: v for k, v in sd.items() if not k.startswith(("module.projection", "module.proto"))}
    assert detect_kind(body)[0] == "torchvision"
    ours = {("backbone." + k if not k.startswith(("projection_head", "prototypes")) else k): v
            for k, v in ((k[len("module."):], v) for k, v in sd.items())}
    kind, flat = detect_kind(ours)
    assert kind == "official" and "conv1.weight" in flat
