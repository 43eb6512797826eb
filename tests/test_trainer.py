"""The training loop: exact resume (also after SIGKILL), NaN guard, resume checks, config checks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swav.checkpoint import load_run_state
from swav.config import ConfigError, make_config
from swav.trainer import ResumeMismatchError, train

REPO = Path(__file__).resolve().parents[1]


def smoke(out, root, *extra):
    return make_config("smoke", overrides=[f"out={out}", f"data.root={root}", "data.subset=256",
                                           "train.batch_size=32", "train.epochs=2", *extra])


def final_weights(out):
    return load_run_state(Path(out) / "checkpoint.pt")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fake_fmnist):
    """An uninterrupted run (with a queue, so its state is covered by resume too)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = smoke(out, fake_fmnist, "swav.queue_length=64", "swav.epoch_queue_starts=1", "train.save_every_steps=3")
    result = train(cfg)
    assert result.global_step == 16
    return out, cfg


def test_resume_in_process_is_exact(reference_run, tmp_path, fake_fmnist):
    ref_out, _ = reference_run
    cfg = smoke(tmp_path, fake_fmnist, "swav.queue_length=64", "swav.epoch_queue_starts=1", "train.save_every_steps=3")
    first = train(cfg, max_steps=11)  # stops mid-epoch 2, after the queue was created
    assert first.global_step == 11
    state = load_run_state(tmp_path / "checkpoint.pt")
    assert state["global_step"] == 11 and state["queue"] is not None
    train(cfg)
    assert_same_weights(final_weights(tmp_path), final_weights(ref_out))
    # metrics of the resumed part equal the uninterrupted run's
    ref = {r["step"]: r["loss"] for r in map(json.loads, open(ref_out / "metrics.jsonl"))}
    got = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert got == ref


def run_cli(out, root, *extra, env=None):
    cmd = [sys.executable, "-m", "swav.cli", "pretrain", "--preset", "smoke", "--no-report", "--out", str(out),
           "--set", f"data.root={root}", "--set", "data.subset=256", "--set", "train.batch_size=32",
           "--set", "train.epochs=2", "--set", "swav.queue_length=64", "--set", "swav.epoch_queue_starts=1",
           "--set", "train.save_every_steps=3", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, fake_fmnist):
    """SIGKILL twice (once while a checkpoint is being written), resume, compare with the
    uninterrupted run: same weights, and no checkpoint file is ever truncated."""
    ref_out = tmp_path / "ref"  # uninterrupted, in the same kind of process (thread count matters)
    proc = run_cli(ref_out, fake_fmnist)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    torch.manual_seed(1234)
    kills = 0
    for attempt in range(2):
        proc = run_cli(out, fake_fmnist)
        deadline = time.time() + 120
        if attempt == 0:  # kill while a temporary checkpoint file exists (mid-write)
            while time.time() < deadline and proc.poll() is None:
                if any(p.name.startswith(".checkpoint.pt.tmp") for p in out.glob(".*")):
                    break
                time.sleep(0.002)
        else:  # kill at a random moment after the run has made progress
            while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
                time.sleep(0.01)
            time.sleep(float(torch.rand(()) * 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for ck in out.glob("checkpoint*.pt"):  # every visible checkpoint is complete
            load_run_state(ck)
    assert kills >= 1
    proc = run_cli(out, fake_fmnist)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_same_weights(final_weights(out), final_weights(ref_out))
    assert not list(out.glob(".checkpoint*.tmp*"))


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, fake_fmnist):
    out = tmp_path / "run"
    proc = run_cli(out, fake_fmnist, "--set", "train.epochs=50")
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "received signal" in err
    state = load_run_state(out / "checkpoint.pt")
    assert 0 < state["global_step"] < 50 * 8


def test_resume_with_other_settings_names_the_fields(tmp_path, fake_fmnist):
    train(smoke(tmp_path, fake_fmnist), max_steps=2)
    with pytest.raises(ResumeMismatchError) as err:
        train(smoke(tmp_path, fake_fmnist, "optim.lr=0.1", "swav.epsilon=0.03"))
    assert "optim.lr" in str(err.value) and "swav.epsilon" in str(err.value)


def test_invalid_config_is_rejected_before_training(tmp_path, fake_fmnist):
    with pytest.raises(ConfigError) as err:
        train(smoke(tmp_path, fake_fmnist, "swav.epsilon=0", "swav.crops_for_assign=[0,7]", "swav.queue_length=40"))
    msg = str(err.value)
    assert "swav.epsilon" in msg and "crops_for_assign" in msg and "queue_length" in msg
    assert not (tmp_path / "checkpoint.pt").exists()


def test_nan_steps_are_skipped_then_training_stops_with_advice(tmp_path, fake_fmnist, monkeypatch):
    import swav.step as step_mod
    from swav.monitor import NonFiniteError

    real = step_mod.swav_objective
    calls = {"n": 0}
    before = {}

    def poisoned(*args, **kw):
        loss, full = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] >= 3:  # from the 3rd step on, the loss is NaN
            return loss * float("nan"), full
        return loss, full

    monkeypatch.setattr(step_mod, "swav_objective", poisoned)
    cfg = smoke(tmp_path / "poisoned", fake_fmnist, "train.nan_patience=3", "train.save_every_steps=1")
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    assert "learning rate" in str(err.value).lower()
    # the skipped steps never reached the weights: they equal a clean run stopped after 2 steps
    monkeypatch.setattr(step_mod, "swav_objective", real)
    train(smoke(tmp_path / "clean", fake_fmnist, "train.nan_patience=3", "train.save_every_steps=1"), max_steps=2)
    poisoned_state = load_run_state(tmp_path / "poisoned" / "checkpoint.pt")
    clean_state = load_run_state(tmp_path / "clean" / "checkpoint.pt")
    assert poisoned_state["global_step"] == 4  # steps 3 and 4 ran, were skipped, the 5th raised
    params = {n for n, _ in __import__("swav.trainer", fromlist=["build_model"]).build_model(cfg).named_parameters()}
    norm = torch.nn.functional.normalize
    for k in params:
        a, b = poisoned_state["model"][k], clean_state["model"][k]
        if k == "prototypes.weight":  # every step starts by projecting the prototypes on the sphere
            a, b = norm(a, dim=1), norm(b, dim=1)
            assert (a - b).abs().max() < 1e-6, k
        else:
            assert torch.equal(a, b), k
    assert poisoned_state["optimizer"]["state"].keys() == clean_state["optimizer"]["state"].keys()
    lines = [json.loads(line) for line in open(tmp_path / "poisoned" / "metrics.jsonl")]
    assert max(r["nonfinite_steps"] for r in lines) >= 2


def test_fp16_loss_scale_overflows_are_not_bad_steps(tmp_path, fake_fmnist, monkeypatch):
    """fp16 with a loss scale far too high: the first steps' gradients overflow. GradScaler skips
    those updates and halves the scale (as apex does); the NaN guard must not count them, or a run
    would stop with "non-finite" after nan_patience of them."""
    import functools

    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch < 2.3 has no CPU GradScaler")
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    cfg = smoke(tmp_path / "fp16", fake_fmnist, "train.precision=fp16", "train.nan_patience=2")
    result = train(cfg)
    assert result.global_step == 16
    state = load_run_state(tmp_path / "fp16" / "checkpoint.pt")
    assert state["scaler"]["scale"] < 2.0 ** 20 / 4  # at least three overflows happened and were halved away
    lines = [json.loads(line) for line in open(tmp_path / "fp16" / "metrics.jsonl")]
    assert max(r["nonfinite_steps"] for r in lines) == 0
    torch.manual_seed(cfg.train.seed)
    init = __import__("swav.trainer", fromlist=["build_model"]).build_model(cfg).state_dict()
    moved = [k for k in init if init[k].is_floating_point() and not torch.equal(init[k], state["model"][k])]
    assert "backbone.conv1.weight" in moved  # the steps after the overflows did update the network


def test_time_budget_fits_steps_not_whole_epochs(tmp_path, fake_fmnist, monkeypatch):
    """A budget worth 1.625 epochs trains 13 steps of 8 (not 1 epoch, which would leave the rest of
    the budget unused): the cosine schedule ends at final_lr on step 13, the cut-short second epoch
    is kept as checkpoint-epoch2.pt, and a run killed inside that epoch resumes to the same weights."""
    from swav.plan import StepPlan

    fitted = []

    def fit(plan, seconds_per_step):
        fitted.append((seconds_per_step, plan.steps_per_epoch))
        return 13  # as if the budget held 13 steps at the measured speed

    monkeypatch.setattr(StepPlan, "steps_for_budget", fit)
    budget = ("train.epochs=4", "train.time_budget_minutes=5", "train.log_every=1", "optim.final_lr=0.0123")
    ref = tmp_path / "ref"
    res = train(smoke(ref, fake_fmnist, *budget))
    assert fitted and fitted[0][1] == 8 and fitted[0][0] > 0
    assert res.global_step == 13 and res.epochs == 2
    state = load_run_state(ref / "checkpoint.pt")
    assert state["total_steps"] == 13 and state["global_step"] == 13 and state["epochs"] == 2
    assert (ref / "checkpoint-epoch2.pt").exists() and not (ref / "checkpoint-epoch3.pt").exists()
    rows = [json.loads(r) for r in open(ref / "metrics.jsonl")]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # after the fit (at step 10) the official cosine over T = 13 steps (smoke: no warmup, lr 0.3):
    # step s used t = s - 1, so the last step is one cosine step above final_lr, not 16 steps' worth
    import math
    cosine = [0.0123 + 0.5 * (0.3 - 0.0123) * (1 + math.cos(math.pi * t / 13)) for t in range(13)]
    assert sorted(lrs) == list(range(1, 14))
    assert [lrs[s] for s in (11, 12, 13)] == pytest.approx(cosine[10:])
    assert "training 2 epoch(s) (13 steps, 1.62 epochs)" in (ref / "log.txt").read_text()

    # killed inside the cut-short epoch, then resumed: the same 13 steps and the same weights
    cut = tmp_path / "cut"
    first = train(smoke(cut, fake_fmnist, *budget), max_steps=11)
    assert first.global_step == 11
    again = train(smoke(cut, fake_fmnist, *budget))
    assert again.global_step == 13
    assert_same_weights(final_weights(cut), final_weights(ref))
    assert len(fitted) == 4  # two fits (steps 10 and 11) per run; the resumed run does not refit

    # stopped before the budget was fitted (step 3 of the first 10): the resumed run fits it
    early = tmp_path / "early"
    train(smoke(early, fake_fmnist, *budget), max_steps=3)
    assert load_run_state(early / "checkpoint.pt")["budget_fitted"] is False
    # (it fits at its 10th step, step 13: the end, so that first fit is final)
    assert train(smoke(early, fake_fmnist, *budget)).global_step == 13 and len(fitted) == 5
    assert load_run_state(early / "checkpoint.pt")["budget_fitted"] is True


def test_time_budget_is_fitted_again_over_a_longer_window(tmp_path, fake_fmnist, monkeypatch):
    """The first fit (8 timed steps) is provisional: the speed is timed again over refit_window()
    steps and that second count is the run's length and the cosine schedule's T."""
    from swav.plan import StepPlan

    counts, timed = [20, 12], []

    def fit(plan, seconds_per_step):
        timed.append(seconds_per_step)
        return counts[len(timed) - 1]

    monkeypatch.setattr(StepPlan, "steps_for_budget", fit)
    out = tmp_path / "run"
    res = train(smoke(out, fake_fmnist, "train.epochs=4", "train.time_budget_minutes=5", "train.log_every=1",
                      "optim.final_lr=0.0123"))
    assert len(timed) == 2 and all(t > 0 for t in timed)
    assert res.global_step == 12 and load_run_state(out / "checkpoint.pt")["budget_fitted"] is True
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r}
    import math
    assert lrs[12] == pytest.approx(0.0123 + 0.5 * (0.3 - 0.0123) * (1 + math.cos(math.pi * 11 / 12)))
    log_text = (out / "log.txt").read_text()
    assert "(first fit, over 8 steps): training 3 epoch(s) (20 steps" in log_text
    assert "(final, over 9 steps): training 2 epoch(s) (12 steps" in log_text


def test_fit_steps_to_budget_bounds():
    from swav.plan import StepPlan

    cfg = make_config("smoke", overrides=["train.epochs=5", "train.time_budget_minutes=1"])
    plan = StepPlan.start(cfg, 8)
    assert plan.steps_for_budget(0.5) == 40  # 120 steps fit, capped at 5 epochs of 8
    assert plan.steps_for_budget(2.0) == 30  # 60 s / 2 s: a cut-short 4th epoch
    assert plan.steps_for_budget(60.0) == 8  # at least one whole epoch
    plan.fit(2.0, final=False)
    assert (plan.total_steps, plan.epochs, plan.budget_fitted) == (30, 4, False)
    assert plan.refit_window() == 9  # at least CALIBRATION_STEPS + 1
    plan.fit(2.0)
    assert (plan.total_steps, plan.epochs, plan.budget_fitted) == (30, 4, True)
    plan.total_steps = 7000
    assert plan.refit_window() == 350  # 5 % of the first-fitted steps


def test_recompute_bn_after_the_last_step(tmp_path, fake_fmnist):
    """train.recompute_bn_images: the final checkpoint holds the same weights as without it, and the
    backbone's BatchNorm statistics of recompute_batchnorm on that many whole training images
    (chosen by the seed); earlier epochs' checkpoints keep the training statistics."""
    import numpy as np

    from swav.build import build_model
    from swav.data.datasets import build_dataset
    from swav.eval.data import EvalData
    from swav.eval.features import recompute_batchnorm

    plain, precise = tmp_path / "plain", tmp_path / "precise"
    cfg = smoke(precise, fake_fmnist, "train.recompute_bn_images=100")
    train(smoke(plain, fake_fmnist))
    train(cfg)
    a, b = final_weights(plain), final_weights(precise)
    stats = [k for k in a if k.startswith("backbone.") and ("running_" in k or "num_batches" in k)]
    assert len(stats) > 10
    for k in a:
        if k not in stats:
            assert torch.equal(a[k], b[k]), f"{k} differs"
    assert all(not torch.equal(a[k], b[k]) for k in stats if "running_" in k)
    assert_same_weights(load_run_state(plain / "checkpoint-epoch1.pt")["model"],
                        load_run_state(precise / "checkpoint-epoch1.pt")["model"])

    model = build_model(cfg)
    model.load_state_dict(a)
    dataset = build_dataset("fashion-mnist", "train", in_chans=1, root=str(fake_fmnist), subset=256)
    idx = np.sort(np.random.default_rng(cfg.train.seed).permutation(256)[:100])
    data = EvalData.from_config(cfg)
    assert recompute_batchnorm(model.backbone, data.batches(dataset, idx), data.transform(dataset), "cpu") == 100
    for k in stats:
        torch.testing.assert_close(b[k], model.state_dict()[k], rtol=0, atol=0)
    assert "BatchNorm statistics of the backbone recomputed on 100 whole training images" in \
        (precise / "log.txt").read_text()
