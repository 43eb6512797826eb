"""Issue 21 in the core install (no timm, torchvision or onnx): a user's own module through
``train``, evaluation and export; ``--init-from`` with our ResNets; parameter kinds for weight decay
and LARS; SyncBatchNorm only where it is plain BatchNorm; crops too small for a network; attention in
the FLOP count; and the one-line install hint of a missing extra (Done-when 4)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swav.cli
from swav.benchmark import count_flops
from swav.build import build_training_state, check_crop_sizes
from swav.checkpoint import StateDictMismatchError, load_run_state
from swav.config import ConfigError, make_config
from swav.distributed import CPUSyncBatchNorm, convert_sync_batchnorm
from swav.eval.weights import export_weights, load_weights
from swav.optim import LARS, build_optimizer
from swav.trainer import train

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """A user's backbone: images -> pooled features, with ``num_features``; total stride 4."""

    num_features = 12

    def __init__(self, in_chans: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, stride=2)  # no padding: needs 3 px, then 3 more
        self.norm = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 12, 3, stride=2)

    def forward(self, x):
        return self.body(torch.relu(self.norm(self.stem(x)))).mean((2, 3))


def module_config(out, root, *extra):
    return make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "data.subset=64", "train.batch_size=32",
                                           "train.epochs=2", "model.width_per_group=64", "model.small_stem=false",
                                           *extra])


# ---------------------------------------------------------------- a user's module
def test_a_users_module_trains_resumes_and_is_evaluated_and_exported_with_it(tmp_path, fake_fmnist, capsys):
    torch.manual_seed(0)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = module_config(tmp_path / "run", fake_fmnist)
    first = train(cfg, backbone=net, max_steps=2)
    assert first.global_step == 2
    state = load_run_state(tmp_path / "run" / "checkpoint.pt")
    assert state["config"]["model"]["arch"] == "module/TinyNet"
    assert set(k for k in state["model"] if k.startswith("backbone.")) == {f"backbone.{k}" for k in before}
    assert train(cfg, backbone=net).global_step == 4  # resumed with the module given again
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()), "the user's object is not trained"

    # the command line cannot rebuild it: exit 2, one line naming the Python API
    assert swav.cli.main(["export", str(tmp_path / "run"), "--format", "safetensors"]) == 2
    assert "backbone=net" in capsys.readouterr().err
    loaded = load_weights(tmp_path / "run", backbone=net)  # net as it was given: also the network at init
    trained = load_run_state(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(v, trained[f"backbone.{k}"]) for k, v in loaded.backbone.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in loaded.fresh().backbone.state_dict().items())  # at init
    from safetensors.torch import load_file

    path = export_weights(loaded, "safetensors", tmp_path / "tiny.safetensors")
    assert all(torch.equal(v, trained[f"backbone.{k}"]) for k, v in load_file(str(path)).items())
    with pytest.raises(ValueError, match="formats are safetensors, onnx"):
        export_weights(loaded, "torchvision", tmp_path / "tiny.pt")


def test_a_module_without_num_features_is_refused(tmp_path, fake_fmnist):
    with pytest.raises(ValueError, match="num_features"):
        train(module_config(tmp_path / "run", fake_fmnist), backbone=nn.Conv2d(1, 4, 3))
    assert not (tmp_path / "run").exists()


def test_a_crop_too_small_for_the_network_names_the_smallest_that_works(tmp_path, fake_fmnist):
    cfg = module_config(tmp_path / "run", fake_fmnist, "augment.size_crops=[28,6]")
    with pytest.raises(ConfigError, match=r"augment.size_crops\[1\] = 6 px is too small for module/TinyNet: the "
                                          r"smallest crop it takes is 7 px"):
        train(cfg, backbone=TinyNet())
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- --init-from, our ResNets
def _exported_run(tmp_path, root):
    out = tmp_path / "src"
    train(make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "data.subset=64", "train.batch_size=32",
                                          "train.epochs=1"]))
    return out


def test_init_from_a_run_an_official_file_and_a_torchvision_file_holds_their_weights(tmp_path, fake_fmnist):
    src = _exported_run(tmp_path, fake_fmnist)
    loaded = load_weights(src)
    want = {k: v.clone() for k, v in loaded.backbone.state_dict().items()}
    files = {"run": src, "official": export_weights(loaded, "official", tmp_path / "o.pth"),
             "torchvision": export_weights(loaded, "torchvision", tmp_path / "tv.pt")}
    head = sorted(k for k in loaded.model.state_dict() if not k.startswith("backbone."))  # head and prototypes
    unused = {"run": head, "official": head, "torchvision": []}
    for kind, path in files.items():
        cfg = make_config("smoke", overrides=[f"model.init_from={path}", "train.seed=5"])
        model, _, _ = build_training_state(cfg, torch.device("cpu"), 1, "fp32")
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), kind
        from swav.checkpoint import load_backbone_weights
        from swav.models import family_of

        report = load_backbone_weights(model.backbone, family_of("resnet18"), path, "resnet18")
        assert report.unused == unused[kind], kind


def test_init_from_names_missing_unexpected_and_misshapen_keys(tmp_path, fake_fmnist):
    loaded = load_weights(_exported_run(tmp_path, fake_fmnist))
    sd = {k: v.clone() for k, v in loaded.backbone.state_dict().items()}
    sd.pop("layer2.0.conv1.weight")
    sd["layer9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    cfg = make_config("smoke", overrides=[f"model.init_from={tmp_path / 'bad.pt'}"])
    with pytest.raises(StateDictMismatchError, match="1 missing keys: layer2.0.conv1.weight; 1 unexpected keys: "
                                                     "layer9.weight"):
        build_training_state(cfg, torch.device("cpu"), 1, "fp32")
    cfg = make_config("smoke", overrides=[f"model.init_from={tmp_path / 'bad.pt'}", "model.width_per_group=16"])
    torch.save(loaded.backbone.state_dict(), tmp_path / "narrow.pt")
    cfg.model.init_from = str(tmp_path / "narrow.pt")
    with pytest.raises(StateDictMismatchError, match=r"100 shape mismatches: bn1.bias \(8,\) vs \(16,\)"):
        build_training_state(cfg, torch.device("cpu"), 1, "fp32")


# ---------------------------------------------------------------- parameter kinds
class Odd(nn.Module):
    """Norms and biases under names that say nothing, and a 1-D parameter that is neither."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.BatchNorm2d(4)
        self.c = nn.LayerNorm(4)
        self.d = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.full((3,), 2.0))  # a weight: 1-D, but not a norm or a bias

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x)).mean((2, 3)))) * self.scale


def test_weight_decay_groups_by_parameter_kind():
    net = Odd()
    opt = build_optimizer(net, "adamw", lr=0.1, weight_decay=0.5, exclude_bias_and_bn=True)
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == {id(net.a.weight), id(net.d.weight), id(net.scale)}  # the ndim <= 1 rule would drop scale
    assert no_decay == {id(p) for p in (net.a.bias, net.b.weight, net.b.bias, net.c.weight, net.c.bias, net.d.bias)}
    named = build_optimizer(net, "sgd", lr=0.1, exclude_bias_and_bn=True, no_weight_decay={"scale"})
    assert id(net.scale) in {id(p) for p in named.param_groups[1]["params"]}


def test_lars_leaves_norms_and_biases_plain_by_kind():
    torch.manual_seed(0)
    net = Odd()
    opt = build_optimizer(net, "lars", lr=0.5, weight_decay=0.1, momentum=0.0, exclude_bias_and_bn=True)
    assert isinstance(opt, LARS) and opt.param_groups[1]["lars_exclude"] is True
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(torch.randn(2, 1, 6, 6)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        plain = n in ("a.bias", "b.weight", "b.bias", "c.weight", "c.bias", "d.bias")
        sgd = before[n] - 0.5 * grads[n]
        assert torch.allclose(p, sgd) == plain, n  # plain SGD exactly where excluded, LARS elsewhere


# ---------------------------------------------------------------- SyncBatchNorm
def test_sync_batchnorm_converts_plain_batchnorm_and_refuses_subclasses():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(2))
    out = convert_sync_batchnorm(net, "cpu")
    assert isinstance(out[1], CPUSyncBatchNorm) and isinstance(out[2], nn.LayerNorm)

    class BatchNormAct(nn.BatchNorm2d):  # what timm's BatchNormAct2d is: a BatchNorm with more in forward
        def forward(self, x):
            return torch.relu(super().forward(x))

    with pytest.raises(ValueError, match=r"model.sync_bn: 1 BatchNorm layer\(s\).*1 \(BatchNormAct\).*sync_bn=false"):
        convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct(4)), "cpu")


# ---------------------------------------------------------------- FLOPs of attention
def test_flop_count_includes_attention():
    class Attention(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):  # (B, N, d), 2 heads
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    net, (b, n, d) = Attention(), (3, 10, 16)
    c = count_flops(net, lambda: net(torch.randn(b, n, d)))
    linear = b * n * d * 3 * d + b * n * d * d
    attention = 2 * b * n * n * d  # QK^T and AV over the 2 heads of width 8
    assert c["forward_flops"] == 2 * (linear + attention)
    # backward: weight gradients of both layers, the input gradient of proj (not of qkv: the input
    # needs none), and both operands' gradients of each attention product
    qkv, proj = b * n * d * 3 * d, b * n * d * d
    assert c["backward_flops"] == 2 * (qkv + 2 * proj + 2 * attention)
    assert dict(c["layers"]) == {"qkv": qkv, "Attention": attention, "proj": proj}


# ---------------------------------------------------------------- a missing extra (Done-when 4)
@pytest.mark.parametrize("arch, extra", [("timm/resnet18", "timm"), ("torchvision/resnet18", "torchvision")])
def test_a_backbone_of_a_missing_library_exits_2_with_one_install_line(arch, extra, tmp_path):
    if importlib.util.find_spec(extra) is not None:
        pytest.skip(f"{extra} is installed here (this checks the core install)")
    r = subprocess.run([sys.executable, "-m", "swav.cli", "pretrain", "--preset", "smoke", "--out", tmp_path / "run",
                        "--set", f"model.arch={arch}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"swav pretrain: error: model.arch = '{arch}' needs {extra}, which is not installed: "
                     f"pip install 'swav[{extra}]'"], r.stderr
    assert not (tmp_path / "run").exists()


def test_onnx_export_without_the_extra_is_one_install_line(tmp_path, fake_fmnist, capsys):
    if importlib.util.find_spec("onnxscript") is not None and importlib.util.find_spec("onnx") is not None:
        pytest.skip("onnx is installed here (this checks the core install)")
    src = _exported_run(tmp_path, fake_fmnist)
    assert swav.cli.main(["export", str(src), "--format", "onnx"]) == 2
    assert "pip install 'swav[onnx]'" in capsys.readouterr().err
