"""Issue 21 with the real libraries: ``--init-from`` a torchvision and a timm state dict (Done-when 3),
the ONNX export of a ResNet-50 against onnxruntime (Done-when 2), a ViT's FLOPs against a count by
hand (Done-when 6), and ``swav bench`` / ``swav report`` on a timm backbone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import swav.cli
from swav.benchmark import count_model_flops
from swav.build import build_training_state
from swav.checkpoint import StateDictMismatchError
from swav.config import make_config
from swav.models import SwAVModel, create_backbone

from .conftest import run_swav

VIT = {"patch_size": 4, "img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg"}


def _cfg(arch, kwargs, init_from, chans=3, **model):
    cfg = make_config("smoke", overrides=[f"model.arch={arch}", "model.width_per_group=64", "model.small_stem=false",
                                          f"model.in_chans={chans}", f"augment.mean={[0.5] * chans}",
                                          f"augment.std={[0.25] * chans}", "augment.size_crops=[32,16]"])
    cfg.model.kwargs, cfg.model.init_from = dict(kwargs), str(init_from)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def _library_files(tmp_path):
    """A torchvision ResNet-18 and a timm ViT as their users save them: every key, classifier included."""
    import timm
    import torchvision

    torch.manual_seed(7)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    vit = timm.create_model("vit_tiny_patch16_224", in_chans=1, **VIT)
    files = {"torchvision": (tmp_path / "resnet18.pth", tv.state_dict()),
             "timm": (tmp_path / "vit.pth", vit.state_dict())}
    for path, sd in files.values():
        torch.save(sd, path)
    return files


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_init_from_a_library_file_holds_exactly_its_weights(library, tmp_path):
    path, sd = _library_files(tmp_path)[library]
    cfg = (_cfg("torchvision/resnet18", {}, path) if library == "torchvision" else
           _cfg("timm/vit_tiny_patch16_224", VIT, path, chans=1, in_chans=1))
    model, _, _ = build_training_state(cfg, torch.device("cpu"), 1, "fp32")
    got = model.backbone.net.state_dict()
    classifier = {"torchvision": ["fc.bias", "fc.weight"], "timm": ["head.bias", "head.weight"]}[library]
    assert sorted(set(sd) - set(got)) == classifier  # the classifier is the only key not used
    for k, v in got.items():
        assert torch.equal(v, sd[k]), f"{k} is not the file's"
    # without --init-from the same build starts elsewhere (the check above can fail)
    cfg.model.init_from = None
    fresh, _, _ = build_training_state(cfg, torch.device("cpu"), 1, "fp32")
    assert any(not torch.equal(v, sd[k]) for k, v in fresh.backbone.net.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_init_from_names_missing_and_unexpected_keys(library, tmp_path):
    path, sd = _library_files(tmp_path)[library]
    dropped = sorted(k for k in sd if k.endswith(".weight"))[1]
    torch.save({**{k: v for k, v in sd.items() if k != dropped}, "extra.stray": torch.zeros(2)}, path)
    cfg = (_cfg("torchvision/resnet18", {}, path) if library == "torchvision" else
           _cfg("timm/vit_tiny_patch16_224", VIT, path, chans=1, in_chans=1))
    with pytest.raises(StateDictMismatchError) as err:
        build_training_state(cfg, torch.device("cpu"), 1, "fp32")
    assert f"1 missing keys: {dropped}" in str(err.value) and "1 unexpected keys: extra.stray" in str(err.value)


def test_init_from_on_the_command_line_is_logged_recorded_and_not_reloaded_on_resume(tmp_path, fake_fmnist):
    path, _ = _library_files(tmp_path)["torchvision"]
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "smoke", "--no-report", "--out", out, "--arch", "torchvision/resnet18",
            "--init-from", path, "--epochs", 2, "--batch-size", 32, "--max-steps", 1, "--precision", "fp32",
            *[a for s in ("model.width_per_group=64", "model.small_stem=false", "augment.size_crops=[32,16]",
                          f"data.root={fake_fmnist}", "data.subset=64") for a in ("--set", s)]]
    r = run_swav(*args)  # the smoke preset's grey images: the RGB stem's filters are summed, and said so
    assert "backbone initialised from" in r.stderr and "2 key(s) of the file not used: fc.bias, fc.weight" in r.stderr
    assert "conv1.weight: its 3 input channels made 1 (RGB filters summed)" in r.stderr
    assert f"init_from: {path}" in (out / "config.yaml").read_text()
    path.write_bytes(b"gone")  # a resumed run never reads the file again
    r = run_swav(*args)
    assert "resumed from" in r.stderr and "initialised from" not in r.stderr


def test_onnx_export_of_a_resnet50_matches_pytorch(tmp_path):
    """Done-when 2: a ResNet-50 (torchvision-layout weights with trained-looking BatchNorm statistics)
    through ``swav export --format onnx``: onnxruntime's features equal PyTorch's within 1e-4 relative
    at batch sizes 1 and 4."""
    import onnxruntime as ort

    torch.manual_seed(3)
    net = create_backbone("resnet50").eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "resnet50.pt")
    onnx_path = tmp_path / "resnet50.onnx"
    run_swav("export", tmp_path / "resnet50.pt", "--format", "onnx", "--size", 64, "--out", onnx_path, timeout=600)
    session = ort.InferenceSession(str(onnx_path))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["input_size"] == "64" and meta["arch"].startswith("resnet50")
    for n in (1, 4):
        x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = net(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"\nResNet-50 ONNX batch {n}: max |onnxruntime - torch| / max |torch| = {rel:.2e}")
        assert got.shape == (n, 2048) and rel <= 1e-4


def test_vit_flops_include_attention_counted_by_hand():
    """Done-when 6: the counter's forward FLOPs of a timm ViT in a SwAV model equal a count by hand of
    every matrix product, attention's two included (2 x multiply-adds)."""
    kw = dict(VIT, depth=3, mlp_ratio=2.0)
    model = SwAVModel(create_backbone("timm/vit_tiny_patch16_224", in_chans=1, **kw), hidden_mlp=64, feat_dim=16,
                      nmb_prototypes=10)
    r = count_model_flops(model, 1, [28, 16], [1, 1], batch_size=1)
    d, depth, hidden = kw["embed_dim"], kw["depth"], int(kw["embed_dim"] * kw["mlp_ratio"])

    def by_hand(side):
        patches = (side // kw["patch_size"]) ** 2
        n = patches + 1  # the class token
        macs = patches * d * 1 * kw["patch_size"] ** 2  # patch embedding: a 4x4 convolution, 1 channel
        per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden  # qkv, QK^T and AV, proj, MLP
        macs += depth * per_block
        macs += d * 64 + 64 * 16 + 16 * 10  # projection head and prototypes
        return 2 * macs

    assert r["per_image"] == {28: by_hand(28), 16: by_hand(16)}
    attention = 2 * depth * 2 * 50 * 50 * d
    assert attention / by_hand(28) > 0.05  # what a counter without attention would miss


def test_bench_and_report_on_a_timm_run(tmp_path, fake_fmnist, capsys):
    assert swav.cli.main(["bench", "--preset", "fashion-mnist-vit", "--steps", "1", "--warmup", "1", "--batch-size",
                          "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["arch"] == "timm/vit_tiny_patch16_224" and res["forward_mflop_per_crop"]["28"] > 0
    assert res["model"].startswith("timm/vit_tiny_patch16_224 (timm") and "width" not in res["model"]
    out = tmp_path / "run"
    assert swav.cli.main(["pretrain", "--preset", "fashion-mnist-vit", "--out", str(out), "--epochs", "1",
                          "--batch-size", "32", "--set", f"data.root={fake_fmnist}", "--set", "data.subset=64",
                          "--set", "train.time_budget_minutes=0", "--set", "train.final_knn=false",
                          "--no-report"]) == 0
    assert swav.cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "timm/vit_tiny_patch16_224 (timm" in page and "No prototype gallery" not in page
