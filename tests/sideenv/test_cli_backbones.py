"""Issue 21, Done-when 1 and 2: timm and torchvision backbones through every command.

For a ConvNeXt, a MobileNet, a RegNet and a ViT from timm and a ResNet and a MobileNet from
torchvision: ``swav pretrain`` trains two steps from the command line (grey input for the timm
networks, colour for torchvision's; crops of two sizes), then ``swav eval knn``, ``swav embed`` and
``swav export`` work on the run; each export loads with strict keys into the real library's model
and gives our features to float32 rounding; the ONNX exports give onnxruntime features equal to
PyTorch's within 1e-4 relative at two batch sizes. The ViT (drop-path on) resumes after SIGKILL to
exactly the weights of an uninterrupted run. On the timm ViT's and torchvision MobileNet's runs, the
other evaluations too: ``swav eval linear``, ``eval finetune``, ``eval clusters``, ``swav cluster``
and ``swav report``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import swav.cli
from swav.checkpoint import load_run_state
from swav.eval.weights import load_weights

from .conftest import REPO, run_swav

VIT = {"patch_size": 4, "img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1,
       "global_pool": "avg"}
# name: (arch, model.kwargs, in_chans, crop sizes, extra settings)
CASES = {
    "timm-convnext": ("timm/convnext_atto", {}, 1, [40, 32], []),
    "timm-mobilenet": ("timm/mobilenetv3_small_050", {}, 1, [32, 16], []),
    "timm-regnet": ("timm/regnetx_002", {}, 1, [32, 16], ["train.time_budget_minutes=0.01"]),
    "timm-vit": ("timm/vit_tiny_patch16_224", VIT, 1, [28, 16], []),
    "tv-resnet": ("torchvision/resnet18", {}, 3, [32, 16], []),
    "tv-mobilenet": ("torchvision/mobilenet_v3_small", {}, 3, [32, 16], []),
}
ONNX_CASES = ("timm-vit", "tv-mobilenet")  # with ResNet-50 in test_onnx.py: every family
EVAL_CASES = ("timm-vit", "tv-mobilenet")  # eval linear, finetune, clusters, cluster and report: one run per library
REL = 1e-5  # features of the same weights in the same library and thread count: float32 rounding


def pretrain_args(out, root, arch, kwargs, chans, crops, extra=(), *more):
    sets = [f"model.arch={arch}", "model.width_per_group=64", "model.small_stem=false", f"model.in_chans={chans}",
            f"augment.mean={[0.5] * chans}", f"augment.std={[0.25] * chans}", f"augment.size_crops={crops}",
            f"model.kwargs={json.dumps(kwargs)}", f"data.root={root}", "data.subset=64", *extra]
    return ["pretrain", "--preset", "smoke", "--no-report", "--out", out, "--epochs", 1, "--batch-size", 32,
            "--device", "cpu", "--precision", "fp32", *more, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory, fake_fmnist):
    name = request.param
    arch, kwargs, chans, crops, extra = CASES[name]
    out = tmp_path_factory.mktemp(name) / "run"
    run_swav(*pretrain_args(out, fake_fmnist, arch, kwargs, chans, crops, extra))
    return name, out


def test_pretrain_records_the_backbone_and_trains(run):
    name, out = run
    arch, kwargs, chans, _, _ = CASES[name]
    state = load_run_state(out / "checkpoint.pt")
    assert state["global_step"] == 2
    assert state["config"]["model"]["arch"] == arch and state["config"]["model"]["kwargs"] == kwargs
    assert json.loads((out / "run.json").read_text())["arch"] == arch
    # the network learned something in two steps: not the weights it started from
    trained = load_weights(out)
    now, start = trained.backbone.state_dict(), trained.fresh().backbone.state_dict()
    assert any(v.is_floating_point() and not torch.equal(v, now[k]) for k, v in start.items())


def test_eval_knn_and_embed(run, tmp_path, capsys):
    name, out = run
    assert swav.cli.main(["eval", "knn", str(out), "--max-train", "64", "--max-test", "32", "--k", "5",
                          "--quiet", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= record["metrics"]["knn_top1@5"] <= 100 and "knn_top1@5" in record["init_metrics"]
    assert swav.cli.main(["embed", str(out), "--split", "test", "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    feats = np.load(tmp_path / "emb" / "features.npy")
    assert feats.shape == (128, load_weights(out).backbone.num_features) and np.isfinite(feats).all()


def _library_model(arch, kwargs, chans, classifier):
    """The library's own model, built as its users build it, classifier removed."""
    library, _, name = arch.partition("/")
    if library == "timm":
        import timm

        return timm.create_model(name, num_classes=0, in_chans=chans, **kwargs)
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **kwargs)
    parent, _, leaf = classifier.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    return model


def test_exports_load_strictly_into_the_library_and_give_our_features(run, tmp_path):
    name, out = run
    arch, kwargs, chans, crops, _ = CASES[name]
    library = arch.split("/")[0]
    ours = load_weights(out).backbone.eval()
    x = torch.randn(3, chans, crops[0], crops[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = {fmt: tmp_path / f"{name}.{fmt}" for fmt in (library, "safetensors")}
    r = run_swav("export", out, "--format", library, "--out", files[library])  # the command itself
    assert str(files[library]) in r.stdout
    assert swav.cli.main(["export", str(out), "--format", "safetensors", "--out", str(files["safetensors"])]) == 0
    with safe_open(str(files["safetensors"]), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == arch and json.loads(meta["model_kwargs"]) == kwargs and meta["in_chans"] == str(chans)
    for fmt, path in files.items():
        sd = load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)
        model = _library_model(arch, kwargs, chans, meta.get("removed_classifier", ""))
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            got = model.eval()(x)
        assert (got - want).abs().max() <= REL * want.abs().max(), f"{fmt}: features differ"
    if library == "timm":  # timm's own loader of local weights, as its users load a checkpoint file
        import timm

        model = timm.create_model(arch.split("/", 1)[1], pretrained=True, num_classes=0, in_chans=chans,
                                  pretrained_cfg_overlay=dict(file=str(files["timm"])), **kwargs)
        with torch.no_grad():
            got = model.eval()(x)
        assert (got - want).abs().max() <= REL * want.abs().max(), "timm.create_model(pretrained=True, file=...)"


@pytest.mark.parametrize("run", ONNX_CASES, indirect=True)  # one network per family: 10-40 s per export here
def test_onnx_export_matches_pytorch_at_two_batch_sizes(run, tmp_path):
    name, out = run
    import onnxruntime as ort

    arch, kwargs, chans, crops, _ = CASES[name]
    path = tmp_path / f"{name}.onnx"
    run_swav("export", out, "--format", "onnx", "--out", path)
    ours = load_weights(out).backbone.eval()
    session = ort.InferenceSession(str(path))
    for n in (1, 5):
        x = torch.randn(n, chans, crops[0], crops[0], generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = ours(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"\n{name} ONNX batch {n}: max |onnxruntime - torch| / max |torch| = {rel:.2e}")
        assert got.shape == want.shape and rel <= 1e-4


def test_vit_with_drop_path_resumes_after_sigkill_to_the_same_weights(tmp_path, fake_fmnist):
    arch, kwargs, chans, crops, _ = CASES["timm-vit"]
    extra = ["data.subset=256", "train.save_every_steps=2", "train.epochs=3"]

    def start(out):
        args = pretrain_args(out, fake_fmnist, arch, kwargs, chans, crops, extra)
        return subprocess.Popen([sys.executable, "-m", "swav.cli", *map(str, args)], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    ref = start(tmp_path / "ref")
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    proc = start(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_run_state(out / "checkpoint.pt")["global_step"]
    assert 0 < killed_at < 24
    proc = start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    a, b = load_run_state(out / "checkpoint.pt"), load_run_state(tmp_path / "ref" / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 24
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after the resume (killed at step {killed_at})"
    # drop-path draws: with them off at the resume point the weights would differ (the check can fail)
    assert a["config"]["model"]["kwargs"]["drop_path_rate"] > 0


# --------------------------------------------------------------------------------------------
# every evaluation: linear, finetune, clusters, cluster, report (one timm and one torchvision run)
# --------------------------------------------------------------------------------------------
RECORD_FIELDS = {"command", "metrics", "init_metrics", "dataset", "checkpoint", "seconds", "version"}
EVALS = {  # result file name -> the command's words; small: 2 epochs, a few hundred images
    "linear": ["linear", "--epochs", 2, "--no-augment", "--max-train", 128, "--max-test", 64],
    "finetune-10pct": ["finetune", "--percent", 10, "--epochs", 2, "--max-test", 32],
    "clusters": ["clusters", "--max-test", 64],
}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(run):
    """``swav eval linear | finetune | clusters`` once on the run (each against the same network at
    initialisation): ``(name, run folder, {result name: record}, checkpoint digest before them)``."""
    name, out = run
    digest = _sha256(out / "checkpoint.pt")
    records = {}
    for result, words in EVALS.items():
        assert swav.cli.main(["eval", *map(str, words), str(out), "--quiet"]) == 0, words
        records[result] = json.loads((out / "eval" / f"{result}.json").read_text())
    return name, out, records, digest


def _check_record(rec: dict, out, metrics: set[str]) -> None:
    assert set(rec) == RECORD_FIELDS and set(rec["metrics"]) == set(rec["init_metrics"]) == metrics
    assert rec["dataset"] == "fashion-mnist" and rec["checkpoint"] == str((out / "checkpoint.pt").resolve())
    assert all(isinstance(v, float) and np.isfinite(v) for m in (rec["metrics"], rec["init_metrics"]) for v in m.values())


@pytest.mark.parametrize("run", EVAL_CASES, indirect=True)
def test_eval_linear(evaluated):
    name, out, records, _ = evaluated
    rec = records["linear"]
    _check_record(rec, out, {"linear_top1", "linear_top5", "linear_best_top1", "linear_best_top5"})
    assert rec["command"].startswith("swav eval linear")
    for m in (rec["metrics"], rec["init_metrics"]):
        assert 0 <= m["linear_top1"] <= m["linear_top5"] <= 100 and 0 <= m["linear_best_top1"] <= 100
        assert m["linear_best_top1"] >= m["linear_top1"] and m["linear_best_top5"] >= m["linear_top5"]


@pytest.mark.parametrize("run", EVAL_CASES, indirect=True)
def test_eval_finetune_leaves_the_run_as_it_was(evaluated):
    """Fine-tuning trains a copy of the backbone: the run's checkpoint is the same file afterwards,
    and the network the evaluations load holds exactly its backbone weights."""
    name, out, records, digest = evaluated
    rec = records["finetune-10pct"]
    _check_record(rec, out, {"finetune_10pct_top1", "finetune_10pct_top5"})
    assert all(0 <= m["finetune_10pct_top1"] <= m["finetune_10pct_top5"] <= 100
               for m in (rec["metrics"], rec["init_metrics"]))
    subset = out / "eval" / "finetune-subset-10pct-seed0.txt"
    labels = [int(line.split("\t")[1]) for line in subset.read_text().splitlines() if not line.startswith("#")]
    assert sorted(set(labels)) == list(range(10))  # a class-balanced 10 % of the labels: every class
    assert _sha256(out / "checkpoint.pt") == digest
    saved = load_run_state(out / "checkpoint.pt")["model"]
    loaded = load_weights(out).backbone.state_dict()
    assert loaded.keys() == {k[len("backbone."):] for k in saved if k.startswith("backbone.")}
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in loaded.items())


@pytest.mark.parametrize("run", EVAL_CASES, indirect=True)
def test_eval_clusters(evaluated):
    name, out, records, _ = evaluated
    rec = records["clusters"]
    _check_record(rec, out, {"nmi", "ari", "purity", "hungarian_acc", "prototypes_used"})
    k = load_weights(out).model.prototypes.weights()[0].shape[0]
    for m in (rec["metrics"], rec["init_metrics"]):  # purity: at least the largest class, 10 % of 64 here
        assert 0 <= m["nmi"] <= 1 and -1 <= m["ari"] <= 1 and 10 <= m["purity"] <= 100
        assert 0 < m["hungarian_acc"] <= 100 and 1 <= m["prototypes_used"] <= k


@pytest.mark.parametrize("run", EVAL_CASES, indirect=True)
def test_cluster_gives_each_image_its_nearest_prototype(run, tmp_path):
    """``swav cluster`` writes one row per image of the split, naming the prototype whose cosine score
    with the image's projection (``swav embed --features projection``) is the highest, and that score."""
    name, out = run
    assert swav.cli.main(["cluster", str(out), "--split", "test", "--out", str(tmp_path / "a.csv"), "--quiet"]) == 0
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert swav.cli.main(["embed", str(out), "--split", "test", "--features", "projection", "--out",
                          str(tmp_path / "emb"), "--quiet"]) == 0
    z = torch.from_numpy(np.load(tmp_path / "emb" / "features.npy"))
    files = (tmp_path / "emb" / "files.txt").read_text().splitlines()
    assert header == ["path", "prototype", "score"] and len(rows) == len(files) == 128
    assert sorted(r[0] for r in rows) == sorted(files) and len(set(files)) == 128  # each image once
    protos = torch.nn.functional.normalize(load_weights(out).model.prototypes.weights()[0].detach(), dim=1)
    scores = z @ protos.t()  # (128, K) cosine scores
    # the file's "%.6f" (half a unit: 5e-7), and two float32 dot products of unit vectors of length D
    # computed in different orders (each within D ulps of 1 of the exact one)
    tol = 5e-7 + 2 * z.shape[1] * torch.finfo(torch.float32).eps
    row_of = {r[0]: r for r in rows}
    for i, path in enumerate(files):
        p, s = int(row_of[path][1]), float(row_of[path][2])
        assert abs(s - scores[i, p]) <= tol and scores[i, p] >= scores[i].max() - tol, (path, p, s)


@pytest.mark.parametrize("run", EVAL_CASES, indirect=True)
def test_report_names_the_backbone_and_the_evaluations(evaluated):
    name, out, records, _ = evaluated
    arch = CASES[name][0]
    assert swav.cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert f"{arch} ({arch.split('/')[0]}" in page  # the model row: arch (family, settings)
    for result in records:
        assert f"eval/{result}.json" in page, result
