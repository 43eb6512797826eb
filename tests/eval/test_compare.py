"""The closing comparison of a run: learned backbone, the same network at initialisation and the raw
pixels, each by kNN and a linear probe on frozen features (issue 12)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from torch import nn

from swav.config import make_config
from swav.eval.compare import Comparison, compare_features, standardise, verdict
from swav.eval.data import EvalData
from swav.eval.knn import knn_accuracy


def _idx_images(folder, prefix):
    raw = gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
    n = int.from_bytes(raw[4:8], "big")
    imgs = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 28 * 28)
    lab = np.frombuffer(gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    return torch.from_numpy(imgs.astype(np.float32)), torch.from_numpy(lab.astype(np.int64))


def test_standardise_uses_the_train_statistics():
    tr = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    te = torch.tensor([[3.0, 6.0, 5.0]])
    a, b = standardise(tr, te)
    assert torch.allclose(a.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[:, [0, 2]].std(0), torch.ones(2))
    assert torch.equal(a[:, 1], torch.zeros(3))  # a constant dimension is only centred
    assert b[0, 0] == 0.0 and b[0, 1] == 1.0 and torch.isclose(b[0, 2], (5 - 5) / tr[:, 2].std())


@pytest.mark.parametrize("learned, expect", [((90.0, 88.0), "learned: the features beat"),
                                             ((84.0, 83.0), "learning, not there yet"),
                                             ((85.0, 87.5), "partly learned: the features beat the raw "
                                                            "pixels under the linear probe (+3.1 points)"),
                                             ((70.0, 70.0), "not learned")])
def test_verdict_says_which_it_beats(learned, expect):
    c = Comparison(knn={"learned": learned[0], "init": 80.0, "pixels": 85.7},
                   linear={"learned": learned[1], "init": 78.0, "pixels": 84.4})
    v = verdict(c)
    assert v.startswith(expect), v
    assert f"{learned[0] - 85.7:+.1f}" in v


def test_pixels_are_measured_as_the_reference_protocol(fake_fmnist):
    """The raw-pixel figures equal kNN on per-pixel standardised images computed here from the files
    themselves; the same network given as learned and init scores the same."""
    cfg = make_config("smoke", overrides=[f"data.root={fake_fmnist}"])
    data = EvalData.from_config(cfg)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    c = compare_features(net, net, data, torch.device("cpu"), k=20, linear_epochs=5)
    xtr, ytr = _idx_images(fake_fmnist, "train")
    xte, yte = _idx_images(fake_fmnist, "t10k")
    str_, ste = standardise(xtr, xte)  # standardising makes the eval transform's affine map irrelevant
    expect = knn_accuracy(str_, ytr, ste, yte, 10, ks=(20,))["knn_top1@20"]
    assert c.knn["pixels"] == pytest.approx(expect, abs=1e-9)
    assert c.knn["learned"] == c.knn["init"] and c.linear["learned"] == c.linear["init"]
    assert set(c.knn) == set(c.linear) == {"learned", "init", "pixels"}
    assert c.train_images == 512 and c.test_images == 128
    assert c.linear["pixels"] > 50  # the fake classes are bars at angles: pixels separate them linearly
    assert "raw pixels" in c.table("fake") and c.verdict in c.table("fake")


def test_a_finished_run_saves_and_reports_the_comparison(tmp_path, fake_fmnist):
    from swav.report import write_report
    from swav.report.html import fmt_number
    from swav.trainer import train

    out = tmp_path / "run"
    cfg = make_config("smoke", overrides=[f"out={out}", f"data.root={fake_fmnist}", "data.subset=64",
                                          "train.batch_size=32", "train.epochs=1", "train.final_knn=true",
                                          "train.final_linear_epochs=2"])
    res = train(cfg)
    assert res.final is not None and set(res.final.knn) == {"learned", "init", "pixels"}
    rec = json.loads((out / "eval" / "final.json").read_text())
    assert rec["baseline"] == "raw pixels" and rec["verdict"] == res.final.verdict
    assert rec["baseline_metrics"]["knn_top1@20"] == pytest.approx(res.final.knn["pixels"])
    assert rec["init_metrics"]["linear_top1"] == pytest.approx(res.final.linear["init"])
    html = write_report(out).read_text()
    assert "<th>raw pixels</th>" in html and res.final.verdict.split(":")[0] in html
    assert f'<td class="num">{fmt_number(rec["baseline_metrics"]["knn_top1@20"])}</td>' in html


def test_pretrain_closes_with_the_table(tmp_path, fake_fmnist, capsys):
    from swav.cli import main

    rc = main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-report", "--epochs", "1",
               "--set", f"data.root={fake_fmnist}", "--set", "data.subset=64", "--set", "train.batch_size=32",
               "--set", "train.final_knn=true", "--set", "train.final_linear_epochs=1"])
    assert rc == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "run" / "eval" / "final.json").read_text())
    pixels_line = next(line for line in out.splitlines() if line.strip().startswith("raw pixels"))
    assert f"{rec['baseline_metrics']['knn_top1@20']:.2f} %" in pixels_line
    assert "same network at init" in out and f"verdict: {rec['verdict']}" in out


def test_fixed_size_builtins_are_evaluated_whole(fake_fmnist, tmp_path):
    """A run trained on 24 px crops of 28 px images is evaluated on the whole 28 px image (a 24 px
    centre crop would cut the garment's edges); image files keep the large crops' size; --size wins."""
    from PIL import Image

    cfg = make_config("smoke", overrides=[f"data.root={fake_fmnist}", "augment.size_crops=[24,14]"])
    data = EvalData.from_config(cfg)
    train = data.split("train")
    assert data.crop_size(train) == 28
    batch = next(iter(data.batches(train, np.arange(4))))
    x = data.transform(train)(batch.images, batch.sizes)
    mean, std = cfg.augment.mean[0], cfg.augment.std[0]
    assert x.shape == (4, 1, 28, 28)
    assert torch.allclose(x, (batch.images.float() / 255 - mean) / std, atol=1e-6)  # every pixel, untouched
    assert EvalData.from_config(cfg, size=20).crop_size(train) == 20

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(folder / "x.png")
    files = EvalData.from_config(cfg, source=str(tmp_path / "imgs"))
    assert files.crop_size(files.split("train")) == 24
