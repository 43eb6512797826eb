"""End to end from the command line, after one short pretraining on fake Fashion-MNIST.

The fake data (bars at class-specific angles) is easy for a random network and is not invariant
to flips, so these tests check that every command runs and reports what it should, not that
pretraining wins here: that is shown on the real Fashion-MNIST (see the report in docs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from swav.cli import main
from swav.config import make_config
from swav.eval.weights import load_weights
from swav.trainer import train

RECORD_FIELDS = {"command", "metrics", "init_metrics", "dataset", "checkpoint", "seconds", "version"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fake_fmnist):
    out = tmp_path_factory.mktemp("evalrun")
    cfg = make_config("smoke", overrides=[f"out={out}", f"data.root={fake_fmnist}", "data.subset=64",
                                          "train.batch_size=32", "train.epochs=2", "train.knn_every=1",
                                          "train.knn_max_train=128", "model.width_per_group=4",
                                          "model.hidden_mlp=16"])
    result = train(cfg)
    assert result.global_step == 4
    return out


def cli(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *argv) -> dict:
    rc, out, err = cli(capsys, *argv, "--json")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    return json.loads(lines[0])


def check_record(rec: dict, run_dir: Path, name: str, compared: bool = True) -> None:
    assert set(rec) == (RECORD_FIELDS if compared else RECORD_FIELDS - {"init_metrics"})
    assert rec["dataset"] == "fashion-mnist" and rec["checkpoint"] == str((run_dir / "checkpoint.pt").resolve())
    assert rec["command"].startswith("swav eval ") and rec["seconds"] > 0
    assert all(isinstance(v, float) for v in rec["metrics"].values())
    if compared:
        assert rec["init_metrics"].keys() == rec["metrics"].keys()
        assert rec["init_metrics"] != rec["metrics"]
        assert json.loads((run_dir / "eval" / f"{name}.json").read_text()) == rec


def test_online_knn_monitor_logs_to_metrics_jsonl(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    knn = [r for r in rows if "knn_top1@20" in r]
    assert [r["step"] for r in knn] == [2, 4]  # after each of the 2 epochs (2 steps each)
    assert all(0 <= r["knn_top1@20"] <= 100 and 0 <= r["knn_top5@20"] <= 100 for r in knn)


def test_eval_knn(capsys, run_dir):
    rec = cli_json(capsys, "eval", "knn", run_dir, "--max-train", 128, "--max-test", 64)
    check_record(rec, run_dir, "knn")
    assert set(rec["metrics"]) == {"knn_top1@20", "knn_top5@20", "knn_top1@200", "knn_top5@200"}
    # the readable table, without --json
    rc, out, _ = cli(capsys, "eval", "knn", run_dir / "checkpoint.pt", "--k", 5, "--no-compare-init",
                     "--out", run_dir / "other", "--max-train", 64, "--max-test", 32)
    assert rc == 0 and "knn_top1@5" in out and "pretrained" in out and "at init" not in out
    assert (run_dir / "other" / "knn.json").exists()


def test_eval_linear(capsys, run_dir):
    rec = cli_json(capsys, "eval", "linear", run_dir, "--epochs", 3, "--no-augment", "--max-train", 128,
                   "--max-test", 64)
    check_record(rec, run_dir, "linear")
    assert set(rec["metrics"]) == {"linear_top1", "linear_top5", "linear_best_top1", "linear_best_top5"}
    # augmented training features: cached views, and fresh every epoch (official)
    for extra in (["--cache-views", 2], []):
        rec = cli_json(capsys, "eval", "linear", run_dir, "--epochs", 2, "--max-train", 64, "--max-test", 32,
                       "--no-compare-init", "--out", run_dir / "aug.json", *extra)
        assert 0 <= rec["metrics"]["linear_top1"] <= 100 and "init_metrics" not in rec


def test_eval_finetune_and_subset_reuse(capsys, run_dir, tmp_path):
    rec = cli_json(capsys, "eval", "finetune", run_dir, "--percent", 10, "--epochs", 2, "--max-test", 32)
    check_record(rec, run_dir, "finetune-10pct")
    assert set(rec["metrics"]) == {"finetune_10pct_top1", "finetune_10pct_top5"}
    subset = run_dir / "eval" / "finetune-subset-10pct-seed0.txt"
    lines = [ln for ln in subset.read_text().splitlines() if not ln.startswith("#")]
    labels = [int(ln.split("\t")[1]) for ln in lines]
    assert len(lines) == 50 and sorted(set(labels)) == list(range(10))  # 10 % of 512, every class
    again = cli_json(capsys, "eval", "finetune", run_dir, "--subset-file", subset, "--percent", 10, "--epochs", 2,
                     "--max-test", 32, "--no-compare-init", "--out", tmp_path)
    assert again["metrics"] == rec["metrics"]  # same labels, same seed: same network


def test_eval_clusters(capsys, run_dir):
    rec = cli_json(capsys, "eval", "clusters", run_dir, "--max-test", 64)
    check_record(rec, run_dir, "clusters")
    m = rec["metrics"]
    assert set(m) == {"nmi", "ari", "purity", "hungarian_acc", "prototypes_used"}
    assert 0 <= m["nmi"] <= 1 and 0 < m["prototypes_used"] <= 20 and 10 <= m["purity"] <= 100
    rec = cli_json(capsys, "eval", "clusters", run_dir, "--assign", "sinkhorn", "--no-compare-init",
                   "--out", run_dir / "sk.json", "--max-test", 64)
    assert rec["metrics"]["prototypes_used"] >= m["prototypes_used"]  # Sinkhorn spreads the images


@pytest.fixture
def bad_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 20, 3), dtype=np.uint8)).save(folder / "odd\nname, \"q\".png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_embed_folder_with_bad_files(capsys, run_dir, bad_folder, tmp_path):
    out = tmp_path / "emb"
    rc, stdout, err = cli(capsys, "embed", run_dir, "--data", bad_folder, "--out", out)
    assert rc == 0, err
    feats = np.load(out / "features.npy")
    assert feats.shape == (3, 32) and feats.dtype == np.float32 and np.isfinite(feats).all()
    names = (out / "files.txt").read_bytes().split(b"\n")[:-1]
    assert [n.rsplit(b"/", 1)[-1] for n in names] == [b"a.png", b'odd\\nname, "q".png', b"b.jpg"]
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and "broken.jpg" in skipped[0] and "empty.png" in skipped[1]
    assert "skipped" in err and "broken.jpg" in err and "empty.png" in err and "2 of 5" in err
    summary = json.loads((out / "embed.json").read_text())
    assert summary["images"] == 3 and summary["skipped"] == 2
    # projection features: the 16-d embedding, unit norm
    rc, _, err = cli(capsys, "embed", run_dir, "--data", bad_folder, "--out", out, "--features", "projection")
    assert rc == 0, err
    z = np.load(out / "features.npy")
    assert z.shape == (3, 16) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)


def test_cluster_folder_with_bad_files(capsys, run_dir, bad_folder, tmp_path):
    out = tmp_path / "a.csv"
    rc, stdout, err = cli(capsys, "cluster", run_dir, "--data", bad_folder, "--out", out)
    assert rc == 0, err
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "prototype", "score"] and len(rows) == 4
    assert rows[2][0].endswith("odd\nname, \"q\".png")  # quoted by the csv module, read back intact
    assert all(0 <= int(r[1]) < 20 and -1 <= float(r[2]) <= 1 for r in rows[1:])
    assert "2 of 5" in err


def test_all_files_bad_is_an_error_not_a_crash(capsys, run_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"nope")
    rc, _, err = cli(capsys, "embed", run_dir, "--data", folder, "--out", tmp_path / "e")
    assert rc == 1 and "none of the 1 file(s)" in err
    assert np.load(tmp_path / "e" / "features.npy").shape == (0, 32)


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors", "official"])
def test_export_cli_reimports_identically(capsys, run_dir, tmp_path, fmt):
    out = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    rc, stdout, err = cli(capsys, "export", run_dir, "--format", fmt, "--out", out)
    assert rc == 0, err
    run, again = load_weights(run_dir), load_weights(out)
    a, b = run.backbone.state_dict(), again.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if fmt == "official":
        a, b = run.model.state_dict(), again.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_released_file_needs_data_and_runs_with_it(capsys, run_dir, tmp_path, fake_fmnist):
    off = tmp_path / "official.pt"
    assert main(["export", str(run_dir), "--format", "official", "--out", str(off)]) == 0
    rc, _, err = cli(capsys, "eval", "knn", off)
    assert rc == 2 and "give --data" in err
    rec = cli_json(capsys, "eval", "knn", off, "--data", "fashion-mnist", "--data-root", fake_fmnist, "--compare-init",
                   "--out", tmp_path / "r.json", "--max-train", 64, "--max-test", 32)
    assert rec["init_metrics"].keys() == rec["metrics"].keys()
    assert json.loads((tmp_path / "r.json").read_text()) == rec


def test_cli_refuses_wrong_and_pickled_files(capsys, tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    rc, _, err = cli(capsys, "eval", "knn", tmp_path / "other.pt", "--data", "fashion-mnist")
    assert rc == 2 and "'encoder.weight'" in err and "torchvision-layout ResNet" in err

    class Marker:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"conv1.weight": torch.zeros(1), "x": Marker()}, tmp_path / "evil.pt")
    rc, _, err = cli(capsys, "export", tmp_path / "evil.pt", "--format", "torchvision")
    assert rc == 2 and "refused" in err
    assert not (tmp_path / "PWNED").exists()
