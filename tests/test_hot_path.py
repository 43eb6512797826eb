"""A step that does not wait for the host (issue 22): in steady state no value of the device is read
on the host, except in the steps where a log line (or a checkpoint) is due.

Steps 5-10 of a smoke run are watched with the calls that make a host wait for a device wrapped and
counted: ``Tensor.item``, ``Tensor.tolist``, ``Tensor.__bool__``, ``Tensor.__float__``,
``Tensor.__int__`` and ``torch.tensor`` (a tensor from host values copied to the device). The run is
on a CPU, where these calls cost nothing; what matters is that the step's code makes none of them
(before issue 22: 11 a step). One read is there by design on a CPU only: Sinkhorn's scaling form
checks the range of the scores on the host, where that is free; on a GPU Sinkhorn runs in the log
domain, which the second case forces.
"""
from __future__ import annotations

import collections
import functools
import traceback
from pathlib import Path

import pytest
import torch

import swav.loss
import swav.step as step_mod
import swav.trainer as trainer_mod
from swav.config import make_config
from swav.sinkhorn import sinkhorn
from swav.trainer import train

WATCHED = ("item", "tolist", "__bool__", "__float__", "__int__")
LOG_EVERY = 5


def _watch(monkeypatch) -> tuple[dict, list]:
    """Count the watched calls per step (from the start of a step to the start of the next) and
    note the steps whose window holds a log line."""
    calls: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    logged: list[int] = []
    step = [-1]

    def where() -> str:
        frame = traceback.extract_stack(limit=4)[-3]
        return f"{Path(frame.filename).name}:{frame.name}"

    for name in WATCHED:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if step[0] >= 3:
                calls[step[0]][(_name, where())] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_tensor = torch.tensor

    def tensor(*a, **k):
        if step[0] >= 3:
            calls[step[0]][("torch.tensor", where())] += 1
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    real_step, real_log = step_mod.train_step, trainer_mod._log_step

    def train_step(*a, **k):
        step[0] += 1
        return real_step(*a, **k)

    def log_step(*a, **k):
        logged.append(step[0])
        return real_log(*a, **k)

    monkeypatch.setattr(step_mod, "train_step", train_step)
    monkeypatch.setattr(trainer_mod, "_log_step", log_step)
    return calls, logged


@pytest.mark.parametrize("sinkhorn_form", ["cpu default", "log domain (as on a GPU)"])
def test_steps_5_to_10_read_nothing_from_the_device_between_log_lines(tmp_path, fake_fmnist, monkeypatch,
                                                                    sinkhorn_form):
    if sinkhorn_form != "cpu default":
        monkeypatch.setattr(swav.loss, "sinkhorn", functools.partial(sinkhorn, linear=False))
    cfg = make_config("smoke", overrides=[f"out={tmp_path}", f"data.root={fake_fmnist}", "data.subset=512",
                                          f"train.log_every={LOG_EVERY}", "train.epochs=2"])
    calls, logged = _watch(monkeypatch)
    train(cfg, max_steps=11)
    window = range(4, 10)  # steps 5-10 (1-based): warm, and two of them log
    assert [s for s in window if s in logged] == [4, 7, 9]  # steps 5 and 10, and the end of epoch 1 (step 8)
    for s in window:
        if s in logged:
            assert sum(calls[s].values()) > 0  # the wrappers do see the log line's reads
            continue
        found = dict(calls[s])
        if sinkhorn_form == "cpu default":  # the scaling form's range check, one per assignment crop
            found.pop(("tolist", "sinkhorn.py:sinkhorn"), None)
        assert not found, f"step {s + 1}: host reads on the hot path: {found}"
