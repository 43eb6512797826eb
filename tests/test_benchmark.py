"""swav bench: the command's JSON fields, and the FLOP counter against hand counts."""
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from swav.benchmark import PHASES, count_flops, count_model_flops, matmul_rate
from swav.cli import main
from swav.models import SwAVModel, create_backbone


def test_bench_smoke_json(capsys):
    rc = main(["bench", "--preset", "smoke", "--steps", "3", "--warmup", "1", "--json", "--matmul-size", "256",
               "--set", "swav.queue_length=128"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("images_per_s", "step_ms", "phases_ms", "phase_fraction", "peak_memory_mib", "model_gflop_per_step",
                "forward_mflop_per_crop", "achieved_tflops", "matmul_tflops", "fraction_of_fp32_matmul",
                "device", "precision", "batch_size", "crops"):
        assert key in r, key
    assert set(r["phases_ms"]) == set(PHASES)
    assert r["images_per_s"] > 0 and r["peak_memory_mib"] > 0
    assert r["steps"] == 3 and r["batch_size"] == 64 and r["crops"] == "2x28+2x16"
    assert abs(sum(r["phase_fraction"].values()) - 1.0) < 0.05  # the phases cover the step
    assert 0 < r["fraction_of_fp32_matmul"] < 10
    assert set(r["forward_mflop_per_crop"]) == {"28", "16"}
    assert r["model"].startswith("resnet18 (width 8")  # the family's own words for its settings


def test_flop_counter_matches_a_hand_count():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    x = torch.zeros(2, 1, 8, 8)
    c = count_flops(net, lambda: net(x))
    conv1 = 2 * 4 * 8 * 8 * (1 * 9)  # outputs x (in / groups) x kernel
    conv2 = 2 * 8 * 4 * 4 * (2 * 9)
    lin = 2 * 5 * 8
    assert c["forward_flops"] == 2 * (conv1 + conv2 + lin)
    # backward: weight gradients everywhere, input gradients except for the first layer (fed by the data)
    assert c["backward_flops"] == 2 * (conv1 + 2 * conv2 + 2 * lin)
    assert [name for name, _ in c["layers"]] == ["0", "2", "5"]


@pytest.mark.parametrize("heads", [30, [30, 10]])
def test_model_flops_agree_with_torch_flop_counter(heads):
    torch.manual_seed(0)
    model = SwAVModel(create_backbone("resnet18", width_per_group=8, in_chans=1, small_stem=True), hidden_mlp=32,
                      feat_dim=16, nmb_prototypes=heads)
    r = count_model_flops(model, 1, [28, 16], [2, 3], batch_size=4)
    expected = 0
    for size, n in ((28, 2), (16, 3)):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.eval()
            model([torch.zeros(4 * n, 1, size, size)])
        expected += fc.get_total_flops()
    assert r["forward_flops"] == pytest.approx(expected, rel=1e-9)
    assert set(r["per_image"]) == {28, 16}
    # training = forward + weight and input gradients (none for the stem's input): just under 3x
    assert 2.9 * r["forward_flops"] < r["train_flops"] < 3 * r["forward_flops"]
    assert model.training is False  # left as it was (eval, set above)


def test_matmul_rate_is_positive():
    assert matmul_rate("cpu", torch.float32, n=128, min_time=0.0) > 0
