"""`swav pretrain` and `swav bench` run the same training step (issue 13): one function,
``swav.step.train_step``, called once per step by both; the SwAV loss is called from ``swav.step``
only (besides ``swav.loss`` itself)."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

import swav.step as step_mod
from swav.benchmark import run_benchmark
from swav.config import make_config
from swav.trainer import train

SRC = Path(__file__).resolve().parents[1] / "src" / "swav"
LOSS_FUNCTIONS = {"swav_loss", "compute_codes", "prediction_loss", "swapped_prediction_loss"}


def _count_steps(monkeypatch):
    calls = []
    real = step_mod.train_step

    def counting(learner, *args, **kwargs):
        calls.append(learner)
        return real(learner, *args, **kwargs)

    monkeypatch.setattr(step_mod, "train_step", counting)
    return calls


def test_pretrain_and_bench_call_the_same_step(tmp_path, fake_fmnist, monkeypatch):
    calls = _count_steps(monkeypatch)
    cfg = make_config("smoke", overrides=[f"out={tmp_path / 'run'}", f"data.root={fake_fmnist}", "data.subset=64",
                                          "train.batch_size=32", "train.epochs=2", "train.final_knn=false"])
    res = train(cfg, max_steps=3)
    assert res.global_step == 3 and len(calls) == 3, "pretrain: one train_step call per step"
    bench_cfg = make_config("smoke", overrides=["swav.queue_length=128"])
    r = run_benchmark(bench_cfg, steps=2, warmup=1, matmul_n=128, free_run=True)
    assert r["steps"] == 2
    assert len(calls) == 3 + 1 + 2 + 2, "bench: warm-up, timed and free-running steps are train_step calls"
    assert calls[3].queue is not None and calls[3].queue.in_use  # the bench measured the step with a queue


def test_a_step_changes_what_it_should(tmp_path, nan_loss_step):
    """train_step updates the weights and pushes the queue; a non-finite step is undone (weights,
    BatchNorm statistics and queue as before)."""
    from swav.benchmark import _learner, synthetic_images
    from swav.data.multicrop import slice_params

    cfg = make_config("smoke", overrides=["swav.queue_length=128"])
    learner, _ = _learner(cfg, torch.device("cpu"), 1, "fp32")
    images = synthetic_images(64, 1, 28, 28)
    params = slice_params(learner.multicrop.sample_params(64, torch.Generator().manual_seed(0)), 0, 64)
    before = {k: v.clone() for k, v in learner.raw_model.state_dict().items()}
    queue_before = learner.queue.buffer.clone()
    out = step_mod.train_step(learner, images, None, params, 0.1)
    assert out.applied and out.batch_size == 64 and torch.isfinite(out.loss)
    after = learner.raw_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not torch.equal(queue_before, learner.queue.buffer)

    state = {k: v.clone() for k, v in learner.raw_model.state_dict().items()}
    queue_state = learner.queue.buffer.clone()
    out = nan_loss_step(learner, images, params, 0.1)
    assert not out.applied and out.causes == ["loss"]
    for k, v in learner.raw_model.state_dict().items():
        if k == "prototypes.weight":  # every step starts by projecting the prototypes onto the sphere
            expect = torch.nn.functional.normalize(state[k], dim=1)
            assert torch.allclose(v, expect, rtol=0, atol=4 * torch.finfo(v.dtype).eps), f"{k}: not just normalised"
        else:
            assert torch.equal(v, state[k]), f"{k} changed by an undone step"
    assert torch.equal(learner.queue.buffer, queue_state)


def _functions_called(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_the_loss_is_called_from_the_step_module_only():
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if p.name != "loss.py" and _functions_called(p) & LOSS_FUNCTIONS)
    assert users == ["step.py"], f"modules besides loss.py that use the loss: {users}"
