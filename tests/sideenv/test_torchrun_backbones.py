"""Issue 21 follow-up: ``swav pretrain`` under a 2-process torchrun (gloo, CPU, 127.0.0.1) with timm
backbones, as tests/test_torchrun.py checks our ResNets: the 2-process run, each process holding half
of the global batch, trains to the weights of a 1-process run with the same global batch.

* a timm MobileNetV3 (34 BatchNormAct2d layers: BatchNorm, then an activation in the same layer)
  with ``model.sync_bn`` on, the default: the timm family synchronises its norm layers
  (``CPUSyncBatchNormAct``); stopped after 2 steps and resumed under torchrun to step 4;
* a timm ViT (LayerNorm and attention; no BatchNorm in the backbone).

How close "equal" is, measured in the test, not chosen: the two runs differ only in the order of
float32 sums (convolutions over 16 images instead of 32, BatchNorm statistics and gradients and the
Sinkhorn sums over 2 processes, DDP's mean of the gradients). Their first losses agree to float32
rounding (measured 1.7e-7 relative; FIRST_LOSS_RTOL = 1e-5), but training carries a rounding-sized
difference far: this test measures how far, as the spread of the 1-process run itself under
perturbations no larger than rounding. Each of PERTURBATIONS runs starts the 1-process run from its
own initial backbone with every weight moved by one float32 ulp up or down (``--init-from``; the same
file unperturbed gives exactly the reference's weights, checked), and d_i = ||w_i - w_1|| /
||w_1 - w_0|| is its distance from the reference (w_0 the initial weights, over all parameters, and
separately over the running statistics). The 2-process run must lie within 2 max_i d_i: a member of
that ensemble (the factor 2: another member may lie up to twice as far as the farthest of
PERTURBATIONS seen), while the 2-process run with ``model.sync_bn=false``, each process
normalising its own 16 images, must not (the check can fail).

Measured on this machine (2 cores), step 4: the MobileNetV3's three 1-ulp starts 3.8e-5, 5.0e-3 and
4.4e-5 (running statistics 2.9e-6, 1.6e-3, 3.3e-6), so a tolerance of 1.0e-2 (3.2e-3); the 2-process
run 5.0e-3 (1.6e-3); without SyncBatchNorm 0.65 (0.14). The response is two-valued: a start lands
either near the reference or as far as the 2-process run (by a switch not identified; the 4-ulp
start of one exploratory seed landed far too), so with PERTURBATIONS starts all landing near, the
tolerance would be too small: a failure here means look at the printed spread first. The
channels-last format or 2 threads move the 1-process run only 5.6e-5 and 3.4e-5 (they reorder
fewer of its sums): no measure of the 2-process run. The ViT: 1-ulp starts
7.0e-5, 4.8e-5, 8.0e-5, the 2-process run 8.3e-5 (tolerance 1.6e-4); its losses agree to 1e-7.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from swav.checkpoint import load_run_state
from swav.eval.weights import load_weights

from .conftest import REPO
from .test_cli_backbones import VIT, pretrain_args

# name: (arch, model.kwargs, crop sizes, epochs); grey input, 64 images, global batch 32: 2 steps per epoch
CASES = {
    "bn-act": ("timm/mobilenetv3_small_050", {}, [32, 16], 2),
    # drop-path draws its masks per process: off, so both runs compute the same function
    "vit": ("timm/vit_tiny_patch16_224", dict(VIT, drop_path_rate=0.0), [28, 16], 1),
}
PERTURBATIONS = 3  # 1-process runs from 1-ulp perturbed initial weights: the spread that rounding gives
FIRST_LOSS_RTOL = 1e-5  # step 1: the same weights, the global batch split over 2 processes
LOSS_RTOL = 1e-4  # tests/test_torchrun.py's, for the ViT's later steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(launcher, out, root, name, *more):
    arch, kwargs, crops, epochs = CASES[name]
    args = pretrain_args(out, root, arch, kwargs, 1, crops, ["train.log_every=1", f"train.epochs={epochs}"], *more)
    cmd = [*launcher, "-m", "swav.cli", *map(str, args)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def _one():
    return [sys.executable]


def _two():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}


def relative_difference(two: dict, one: dict, start: dict, buffers: bool) -> float:
    """||two - one|| / ||one - start|| over the floating-point parameters (or running statistics)."""
    keys = [k for k, v in one.items() if v.is_floating_point() and ("running_" in k) == buffers]
    diff = torch.cat([(two[k] - one[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(one[k] - start[k]).flatten() for k in keys]).norm()
    assert moved > 0, "nothing trained"
    return float(diff / moved)


def _write_perturbed_start(one, path, seed: int) -> None:
    """The reference's initial backbone in its library's layout (what ``--init-from`` reads), every
    weight moved one float32 ulp up or down at random (seed 0: not moved); running statistics as
    they are."""
    fresh = load_weights(one).fresh()
    sd = fresh.family.export_state_dict(fresh.backbone)
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if seed and v.is_floating_point() and "running_" not in k:
            up = torch.rand(v.shape, generator=g) < 0.5
            sd[k] = torch.nextafter(v, torch.where(up, float("inf"), float("-inf")))
            assert (sd[k] != v).all()
    torch.save(sd, path)


def _distances(name: str, base, other, ckpt: str) -> tuple[float, ...]:
    """(parameters, running statistics) distance of run ``other`` from the reference at ``ckpt``."""
    start = load_weights(base / "one").fresh().model.state_dict()
    ref, got = (load_run_state(base / r / ckpt)["model"] for r in ("one", other))
    assert got.keys() == ref.keys(), other
    for k, v in ref.items():  # step counters of the BatchNorm layers
        if not v.is_floating_point():
            assert torch.equal(got[k], v), f"{other}: {k}"
    kinds = (False, True) if any("running_" in k for k in ref) else (False,)
    return tuple(relative_difference(got, ref, start, buffers=b) for b in kinds)


def _tolerance(name: str, base, ckpt: str) -> tuple[float, ...]:
    """2 x the farthest that a 1-ulp perturbed start takes the 1-process run (see the docstring)."""
    assert not any(_distances(name, base, "ulp0", ckpt)), "--init-from alone changed the run"
    spread = [_distances(name, base, f"ulp{i}", ckpt) for i in range(1, PERTURBATIONS + 1)]
    print(f"\n{name} {ckpt}: 1-ulp starts {spread}", end="")
    return tuple(2 * max(d) for d in zip(*spread))


def _assert_within(name: str, base, run: str, ckpt: str, inside: bool = True) -> None:
    got, tol = _distances(name, base, run, ckpt), _tolerance(name, base, ckpt)
    print(f"; {run}: {got}, tolerance {tol}", end="")
    what = ("parameters", "running statistics")
    for d, t, w in zip(got, tol, what):
        if inside:
            assert d <= t, f"{run} at {ckpt}: {w} {d:.3g} of the distance trained, rounding gives up to {t:.3g}"
    if not inside:
        assert any(d > t for d, t in zip(got, tol)), f"{run} at {ckpt}: {got} within rounding's {tol}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fake_fmnist):
    """For each case: a 1-process run (the reference), the same from PERTURBATIONS 1-ulp perturbed
    starts (and one unperturbed, through the same ``--init-from``), and 2-process torchruns of the same
    settings: the BatchNorm network's stopped after epoch 1 (step 2), and one without SyncBatchNorm."""
    made = {}
    for name, case in CASES.items():
        base = tmp_path_factory.mktemp(f"torchrun-{name}")
        _pretrain(_one(), base / "one", fake_fmnist, name)
        for i in range(PERTURBATIONS + 1):
            _write_perturbed_start(base / "one", base / f"ulp{i}.pt", i)
            _pretrain(_one(), base / f"ulp{i}", fake_fmnist, name, "--init-from", base / f"ulp{i}.pt")
        stop = ["--max-steps", 2] if case[3] > 1 else []
        _pretrain(_two(), base / "two", fake_fmnist, name, *stop)
        if name == "bn-act":
            _pretrain(_two(), base / "two-no-sync", fake_fmnist, name, "--set", "model.sync_bn=false")
        made[name] = base
    return made


def _assert_first_loss(one, two):
    l1, l2 = _losses(one), _losses(two)
    assert abs(l2[1] - l1[1]) <= FIRST_LOSS_RTOL * abs(l1[1]), (l1[1], l2[1])
    return l1, l2


def test_two_processes_with_sync_batchnorm_act_equal_one_then_resume(runs, fake_fmnist):
    base = runs["bn-act"]
    one, two = base / "one", base / "two"
    start = load_weights(one).fresh().model.state_dict()
    stopped = load_run_state(two / "checkpoint.pt")
    assert stopped["global_step"] == 2 and stopped["config"]["model"]["sync_bn"] is True
    assert "2 process(es)" in (two / "log.txt").read_text()
    # the synchronised BatchNormAct2d layers saved their running statistics under the layers' own keys
    assert set(stopped["model"]) == set(start)
    assert load_run_state(two / "checkpoint-epoch1.pt")["global_step"] == 2
    _assert_within("bn-act", base, "two", "checkpoint-epoch1.pt")

    r = _pretrain(_two(), two, fake_fmnist, "bn-act")  # resumed under torchrun to the end of epoch 2
    assert "resumed from" in r.stderr and "written by 2 process(es), now 2" in r.stderr
    assert load_run_state(two / "checkpoint.pt")["global_step"] == load_run_state(one / "checkpoint.pt")["global_step"] == 4
    _assert_within("bn-act", base, "two", "checkpoint.pt")
    l1, l2 = _assert_first_loss(one, two)
    assert sorted(l2) == sorted(l1) == [1, 2, 3, 4]


def test_without_sync_batchnorm_two_processes_train_something_else(runs):
    """The check above can fail: each process normalising its own half of the batch is no rounding."""
    base = runs["bn-act"]
    assert load_run_state(base / "two-no-sync" / "checkpoint.pt")["config"]["model"]["sync_bn"] is False
    for ckpt in ("checkpoint-epoch1.pt", "checkpoint.pt"):
        _assert_within("bn-act", base, "two-no-sync", ckpt, inside=False)


def test_two_processes_equal_one_with_a_vit(runs):
    base = runs["vit"]
    one, two = base / "one", base / "two"
    a, b = load_run_state(two / "checkpoint.pt"), load_run_state(one / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 2 and a["config"]["model"]["arch"] == CASES["vit"][0]
    _assert_within("vit", base, "two", "checkpoint.pt")
    l1, l2 = _assert_first_loss(one, two)
    assert sorted(l2) == sorted(l1) == [1, 2]
    assert abs(l2[2] - l1[2]) <= LOSS_RTOL * abs(l1[2]), (l1[2], l2[2])
