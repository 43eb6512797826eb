"""A NaN or inf anywhere in a training step never reaches the run state: the step is skipped and
every parameter, BatchNorm buffer (running mean/var, batch count), optimizer slot and queue row is
what it was before the step. tests/test_trainer.py covers a NaN loss and the patience limit; here
the fault enters earlier: in the input crops, in an activation (which poisons the BatchNorm
statistics during the forward pass, before any loss exists), or only in a BatchNorm running variance
(a finite activation whose square overflows) while the loss and every gradient stay finite."""
from __future__ import annotations

import json

import pytest
import torch

import swav.build as build_mod
from swav.checkpoint import load_run_state
from swav.config import make_config
from swav.data.multicrop import MultiCrop
from swav.trainer import train

from .conftest import assert_same_tensors

POISONED_STEP = 3  # the queue (64 rows, 32 per step, from step 1) is in use from step 3 on


def smoke(out, root):
    return make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "data.subset=128",
                                           "train.batch_size=32", "train.epochs=2", "swav.queue_length=64",
                                           "swav.epoch_queue_starts=0", "train.nan_patience=3"])


@pytest.fixture(scope="module")
def clean_state(tmp_path_factory, fake_fmnist):
    out = tmp_path_factory.mktemp("clean")
    train(smoke(out, fake_fmnist), max_steps=POISONED_STEP - 1)
    return load_run_state(out / "checkpoint.pt")


def _poison_crops(monkeypatch):
    real, calls = MultiCrop.forward, {"n": 0}

    def forward(self, *a, **k):
        crops = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == POISONED_STEP:
            crops[1][3, 0, 5, 5] = float("inf")
        return crops

    monkeypatch.setattr(MultiCrop, "forward", forward)


def _hooked_model(monkeypatch, module_name, hook):
    """Apply ``hook`` to ``module_name`` at its first call of training step POISONED_STEP (the
    model runs each crop resolution separately, so a module runs several times per step)."""
    real = build_mod.build_model

    def build(cfg):
        model = real(cfg)
        state = {"step": 0, "done": False}

        def count_steps(mod, inp):
            if mod.training:
                state["step"] += 1

        def poison(mod, inp, out):
            if mod.training and state["step"] == POISONED_STEP and not state["done"]:
                state["done"] = True
                return hook(mod, out)
            return None

        model.register_forward_pre_hook(count_steps)
        model.get_submodule(module_name).register_forward_hook(poison)
        return model

    monkeypatch.setattr(build_mod, "build_model", build)


def _inf_activation(mod, out):
    out = out.clone()
    out[0, 0, 0, 0] = float("inf")  # the next BatchNorm's batch mean becomes inf, its variance NaN
    return out


def _huge_activation(mod, out):
    # finite, but its square overflows float32: the next BatchNorm's running variance becomes inf
    # while its output, the loss and every gradient stay finite
    return out * 1e20


@pytest.mark.parametrize("where", ["input crops", "activation", "BN variance overflow only"])
def test_nonfinite_step_leaves_every_parameter_and_buffer_unchanged(tmp_path, fake_fmnist, monkeypatch,
                                                                    clean_state, where):
    if where == "input crops":
        _poison_crops(monkeypatch)
    elif where == "activation":
        _hooked_model(monkeypatch, "backbone.layer2.0.conv1", _inf_activation)
    else:
        _hooked_model(monkeypatch, "backbone.layer2.0.conv1", _huge_activation)
    train(smoke(tmp_path, fake_fmnist), max_steps=POISONED_STEP)
    got = load_run_state(tmp_path / "checkpoint.pt")
    assert got["global_step"] == POISONED_STEP and got["nonfinite_steps"] == 1
    assert (tmp_path / "log.txt").read_text().count("step skipped") == 1
    want = clean_state
    for key, value in want["model"].items():
        if key == "prototypes.weight":  # a step starts by putting the prototypes back on the sphere
            n = torch.nn.functional.normalize
            assert (n(got["model"][key], dim=1) - n(value, dim=1)).abs().max() < 1e-6
        else:
            assert_same_tensors(got["model"][key], value, key)  # parameters and buffers, bit for bit
    assert_same_tensors(got["optimizer"]["state"], want["optimizer"]["state"], "optimizer state")
    assert got["queue"]["in_use"] == want["queue"]["in_use"]
    assert_same_tensors(got["queue"]["buffer"], want["queue"]["buffer"], "queue")


def test_training_goes_on_after_a_skipped_step(tmp_path, fake_fmnist, monkeypatch):
    """The skipped step does not leave a poisoned queue or BN statistic behind: later steps are finite."""
    _hooked_model(monkeypatch, "backbone.layer2.0.conv1", _inf_activation)
    result = train(smoke(tmp_path, fake_fmnist), max_steps=POISONED_STEP + 2)
    state = load_run_state(tmp_path / "checkpoint.pt")
    assert result.global_step == POISONED_STEP + 2 and state["nonfinite_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
               if r["step"] > POISONED_STEP)  # finite (not NaN) losses after the skipped step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert torch.isfinite(state["queue"]["buffer"]).all()
