"""A non-finite step is undone exactly without the host reading the verdict (issue 22): LARS takes
the device-side flag and leaves parameters and momentum bit for bit; the other optimizers, the
GradScaler and the per-group ``lars_exclude`` flag (the optim.py contract with issue 21)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import swav.step as step_mod
from swav.benchmark import _learner, synthetic_images
from swav.config import make_config
from swav.data.multicrop import slice_params
from swav.optim import LARS, build_optimizer, load_optimizer_state


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return net.to(memory_format=torch.channels_last)  # strided parameters: the flat views follow them


def _lars(net, **kw):
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    return LARS([{"params": decay}, {"params": rest, "lars_exclude": True, "weight_decay": 0.0}],
                lr=0.3, momentum=0.9, weight_decay=1e-4, eta=0.02, **kw)


def _grads(net, seed):
    net.zero_grad(set_to_none=True)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    net(x).pow(2).mean().backward()


def _state(net, opt):
    return [p.detach().clone() for p in net.parameters()], [opt.state[p]["momentum_buffer"].clone()
                                                           for p in net.parameters()]


def test_lars_skip_flag_leaves_everything_bit_for_bit():
    """Steps a, (poisoned, flagged), b give exactly the parameters and momentum of steps a, b."""
    runs = []
    for poisoned in (False, True):
        net = _net()
        opt = _lars(net)
        for seed in ([1, 99, 2] if poisoned else [1, 2]):
            _grads(net, seed)
            bad = seed == 99
            if bad:
                for p in net.parameters():
                    p.grad.fill_(float("nan"))
            opt.step(found_inf=torch.tensor(float(bad)))
        runs.append(_state(net, opt))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


def test_lars_spread_factors_equal_per_tensor_factors(monkeypatch):
    """The GPU's way of applying the trust ratios (spread over one flat buffer) gives the CPU's."""
    import swav.optim as optim

    runs = []
    for spread in ((), ("cpu",)):
        monkeypatch.setattr(optim._LarsBucket, "SPREAD_ON", spread)
        net = _net()
        opt = _lars(net)
        for seed in (1, 2, 3):
            _grads(net, seed)
            opt.step(found_inf=torch.tensor(0.0))
        runs.append(_state(net, opt))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lars_first_step_skipped_creates_no_state():
    net = _net()
    opt = _lars(net)
    _grads(net, 1)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(found_inf=torch.tensor(1.0))
    assert len(opt.state) == 0 and all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_lars_exclude_group_is_plain_sgd_for_every_shape():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    w0, g = w.detach().clone(), torch.randn(3, 4, dtype=torch.float64)
    v = nn.Parameter(w0.clone())
    opt = LARS([{"params": [w], "lars_exclude": True, "weight_decay": 0.0}, {"params": [v]}], lr=0.2,
               weight_decay=0.1)
    w.grad, v.grad = g.clone(), g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.2 * g, rtol=1e-15, atol=1e-15)
    local = 0.001 * w0.norm() / (g.norm() + 0.1 * w0.norm() + 1e-8)  # the other group: the LARS rule
    torch.testing.assert_close(v.detach(), w0 - 0.2 * local * (g + 0.1 * w0), rtol=1e-15, atol=1e-15)


def test_lars_steady_state_step_reads_nothing_on_the_host(monkeypatch):
    net = _net()
    opt = _lars(net)
    _grads(net, 1)
    opt.step(found_inf=torch.tensor(0.0))  # the first step creates the momentum buffers
    _grads(net, 2)
    flag = torch.zeros(())
    seen = collections.Counter()

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            seen[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counting(torch.Tensor, name)
    counting(torch, "tensor")
    opt.step(found_inf=flag)
    assert not seen, dict(seen)


def test_lars_under_grad_scaler_takes_its_overflow_on_the_device():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch < 2.3 has no CPU GradScaler")
    net = _net()
    opt = _lars(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(8, 3, 8, 8)
    for huge in (False, True):
        net.zero_grad(set_to_none=True)
        scaler.scale(net(x).pow(2).mean() * (1e38 if huge else 1.0)).backward()
        before = _state(net, opt) if huge else None
        scaler.step(opt)  # not unscaled: LARS divides by grad_scale itself
        scaler.update()
    after = _state(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("optimizer, precision", [("lars", "fp16"), ("adamw", "fp32"), ("sgd", "fp32"),
                                                  ("adamw-fused", "fp32")])
def test_a_bad_step_leaves_the_optimizer_and_scaler_as_before(optimizer, precision, nan_loss_step):
    """train_step with a non-finite loss: the model, the optimizer's state (momentum, AdamW's step
    counts and moments) and the GradScaler's scale and growth count are what they were. The fused
    AdamW (what CUDA runs get; torch has it on the CPU too) takes the verdict as its found_inf."""
    if precision == "fp16" and not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch < 2.3 has no CPU GradScaler")
    cfg = make_config("smoke", overrides=[f"optim.optimizer={optimizer.split('-')[0]}", f"train.precision={precision}"])
    learner, _ = _learner(cfg, torch.device("cpu"), 1, precision)
    if optimizer == "adamw-fused":
        learner.optimizer = build_optimizer(learner.raw_model, "adamw", cfg.optim.lr, cfg.optim.weight_decay,
                                            fused=True)
        assert learner.optimizer._step_supports_amp_scaling
    images = synthetic_images(16, 1, 28, 28)
    params = slice_params(learner.multicrop.sample_params(16, torch.Generator().manual_seed(0)), 0, 16)
    for _ in range(2):
        assert step_mod.train_step(learner, images, None, params, 0.1).applied
    model = {k: v.clone() for k, v in learner.raw_model.state_dict().items()}
    opt = {k: v.clone() for k, v in _flat(learner.optimizer.state_dict()).items()}
    scaler = {k: v.clone() for k, v in vars(learner.scaler).items() if isinstance(v, torch.Tensor)} \
        if learner.scaler is not None else {}
    out = nan_loss_step(learner, images, params, 0.1)
    assert not out.applied and out.causes == ["loss"]
    for k, v in learner.raw_model.state_dict().items():
        if k != "prototypes.weight":  # a step starts by putting the prototypes back on the sphere
            assert torch.equal(v, model[k]), k
    got = _flat(learner.optimizer.state_dict())
    assert got.keys() == opt.keys() and all(torch.equal(got[k], opt[k]) for k in opt)
    for k, v in scaler.items():
        assert torch.equal(getattr(learner.scaler, k), v), k


def _flat(state_dict: dict) -> dict:
    out = {}
    for p, st in state_dict["state"].items():
        for k, v in st.items():
            out[f"{p}.{k}"] = torch.as_tensor(v)
    return out


def test_a_fused_adamw_resumed_from_a_cpu_checkpoint_stays_fused():
    """A checkpoint of a plain AdamW (a CPU run's: its groups say fused=None) loaded into the fused
    one a CUDA run builds: it still runs fused and takes the skip flag (torch's plain AdamW would
    refuse a found_inf), and the state it took over is the checkpoint's."""
    net = _net()
    plain = build_optimizer(net, "adamw", 0.01, 0.05, fused=False)
    _grads(net, 1)
    plain.step()
    saved = plain.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    fused = build_optimizer(net, "adamw", 0.01, 0.05, fused=True)
    load_optimizer_state(fused, saved)
    assert all(g["fused"] is True for g in fused.param_groups)
    before = [p.detach().clone() for p in net.parameters()]
    _grads(net, 2)
    fused.grad_scale, fused.found_inf = None, torch.tensor(1.0)
    fused.step()  # skipped on the device
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert all(int(fused.state[p]["step"]) == 1 for p in net.parameters())
    del fused.grad_scale, fused.found_inf
    fused.step()
    assert all(int(fused.state[p]["step"]) == 2 for p in net.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_lars_loads_a_checkpoint_from_before_lars_exclude():
    """Groups saved before the per-group ``lars_exclude`` existed step as groups without it."""
    net = _net()
    old = _lars(net)
    _grads(net, 1)
    old.step()
    saved = old.state_dict()
    for g in saved["param_groups"]:
        del g["lars_exclude"]
    new = _lars(net)
    load_optimizer_state(new, saved)
    assert [g["lars_exclude"] for g in new.param_groups] == [False, False]
    _grads(net, 2)
    new.step()
