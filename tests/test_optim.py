"""Tests for swav.optim: the LARS rule, the optimiser factory and the LR schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from swav.optim import LARS, build_optimizer, cosine_schedule, lars_local_lr, set_lr

LR, MOM, WD, ETA = 0.5, 0.9, 1e-2, 0.001


def _reference_lars(ws, grads_per_step, lr, momentum, wd, eta, exclude=False):
    """LARS by hand in float64 numpy: returns the weights after each step.

    ``grads_per_step[s][i]`` is the gradient of parameter i at step s, or None (skipped).
    """
    ws = [np.array(w, dtype=np.float64) for w in ws]
    bufs = [None] * len(ws)
    history = []
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = np.asarray(g, dtype=np.float64)
            w = ws[i]
            pn, gn = np.linalg.norm(w), np.linalg.norm(g)
            if (exclude and w.ndim <= 1) or pn == 0 or gn == 0:
                upd = g
            else:
                local = eta * pn / (gn + wd * pn + 1e-8)
                upd = (g + wd * w) * local
            bufs[i] = upd.copy() if bufs[i] is None else momentum * bufs[i] + upd
            ws[i] = w - lr * bufs[i]
        history.append([w.copy() for w in ws])
    return history


def _make_case(seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(3, 4)), rng.normal(size=(4,)), rng.normal(size=(2, 2)),
          rng.normal(size=(3,))]
    steps = []
    for _ in range(3):
        steps.append([rng.normal(size=(3, 4)) * 5, rng.normal(size=(4,)) * 0.1,
                      np.zeros((2, 2)), None])
    return ws, steps


def _run_lars(ws, steps, **kw):
    params = [nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in ws]
    opt = LARS(params, **kw)
    history = []
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return params, opt, history


@pytest.mark.parametrize("exclude", [False, True])
def test_lars_matches_hand_formula_over_three_steps(exclude):
    ws, steps = _make_case()
    _, _, got = _run_lars(ws, steps, lr=LR, momentum=MOM, weight_decay=WD, eta=ETA,
                          exclude_bias_and_bn=exclude)
    want = _reference_lars(ws, steps, LR, MOM, WD, ETA, exclude=exclude)
    for s in range(len(steps)):
        for g, w in zip(got[s], want[s]):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


def test_lars_zero_grad_and_none_grad_params():
    ws, steps = _make_case(1)
    params, opt, _ = _run_lars(ws, steps, lr=LR, momentum=MOM, weight_decay=WD, eta=ETA)
    # zero gradient: apex leaves the gradient as is (no weight decay), so nothing moves
    np.testing.assert_array_equal(params[2].detach().numpy(), ws[2])
    # grad None: untouched and no momentum state at all
    np.testing.assert_array_equal(params[3].detach().numpy(), ws[3])
    assert len(opt.state[params[3]]) == 0
    assert "momentum_buffer" in opt.state[params[0]]


def test_lars_zero_weight_is_plain_sgd_step():
    p = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    g = torch.arange(6, dtype=torch.float64).reshape(3, 2) + 1
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.001)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * g)


def test_lars_first_step_size_is_trust_ratio():
    """First step moves w by lr * eta * ||w|| (times ||g + wd w|| / (||g|| + wd ||w||))."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, dtype=torch.float64)
    p = nn.Parameter(w.clone())
    p.grad = torch.randn(8, 8, dtype=torch.float64) * 100
    opt = LARS([p], lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.001)
    opt.step()
    step = (p.detach() - w).norm()
    torch.testing.assert_close(step, 0.001 * w.norm(), rtol=1e-6, atol=0)


def test_lars_exclude_bias_and_bn_gives_plain_sgd_for_1d():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gw, gb = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    opt = build_optimizer(lin, "lars", lr=0.2, weight_decay=0.1, momentum=0.9, lars_eta=0.001,
                          exclude_bias_and_bn=True)
    lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
    opt.step()
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.2 * gb)  # no wd, no trust ratio
    local = 0.001 * w0.norm() / (gw.norm() + 0.1 * w0.norm() + 1e-8)
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.2 * local * (gw + 0.1 * w0))


def test_lars_matches_apex_style_larc_around_sgd():
    """Same trajectory as the apex recipe: fold wd into grad, scale, then torch SGD (wd=0)."""
    torch.manual_seed(0)
    net_a = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    net_b = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    net_b.load_state_dict(net_a.state_dict())
    ours = LARS(net_a.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4, eta=0.02)
    sgd = torch.optim.SGD(net_b.parameters(), lr=0.3, momentum=0.9, weight_decay=0.0)
    x = torch.randn(16, 5)
    for step in range(4):
        for net in (net_a, net_b):
            net.zero_grad(set_to_none=True)
            net(x * (step + 1)).pow(2).mean().backward()
        with torch.no_grad():
            for p in net_b.parameters():
                pn, gn = p.norm(), p.grad.norm()
                if pn != 0 and gn != 0:
                    p.grad += 1e-4 * p
                    p.grad *= 0.02 * pn / (gn + 1e-4 * pn + 1e-8)
        ours.step()
        sgd.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_lars_float32_and_set_lr():
    p = nn.Parameter(torch.ones(4, 4))
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.1)
    set_lr(opt, 0.0)
    p.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 4))
    set_lr(opt, 1.0)
    opt.step()  # local lr = 0.1 * 4 / 4 = 0.1
    torch.testing.assert_close(p.detach(), torch.full((4, 4), 0.9))
    assert p.dtype == torch.float32


def test_lars_local_lr_helper():
    pn = torch.tensor([2.0, 0.0, 3.0])
    gn = torch.tensor([1.0, 1.0, 0.0])
    out = lars_local_lr(pn, gn, weight_decay=0.5, eta=0.01)
    torch.testing.assert_close(out, torch.tensor([0.01 * 2 / (1 + 1 + 1e-8), 1.0, 1.0]))


def test_build_optimizer_kinds_and_errors():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert isinstance(build_optimizer(net, "LARS", lr=0.1), LARS)
    sgd = build_optimizer(net, "sgd", lr=0.1, weight_decay=0.01, exclude_bias_and_bn=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]
    assert len(sgd.param_groups[1]["params"]) == 3  # linear bias + bn weight + bn bias
    adamw = build_optimizer(list(net.parameters()), "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*lars, sgd, adamw"):
        build_optimizer(net, "adam", lr=0.1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, "sgd", lr=0.1)


def test_cosine_schedule_shape_and_values():
    lrs = cosine_schedule(4.8, 0.0048, epochs=20, steps_per_epoch=7, warmup_epochs=10,
                          start_warmup=0.3)
    assert lrs.dtype == np.float64 and lrs.shape == (140,)
    W = 70
    assert lrs[0] == pytest.approx(0.3)
    assert lrs[W - 1] == pytest.approx(4.8)  # end of warmup
    assert lrs[W] == pytest.approx(4.8)  # cosine starts at base_lr (official formula)
    assert np.all(np.diff(lrs[:W]) > 0)
    assert np.all(np.diff(lrs[W:]) < 0)
    T = 70
    assert lrs[-1] == pytest.approx(0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * (T - 1) / T)))
    assert lrs[-1] == pytest.approx(0.0048, abs=5e-3)


def test_cosine_schedule_fractional_and_no_warmup():
    lrs = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=10, warmup_epochs=0.5)
    assert len(lrs) == 30
    np.testing.assert_allclose(lrs[:5], np.linspace(0.0, 1.0, 5))
    assert lrs[5] == 1.0
    plain = cosine_schedule(1.0, 0.1, epochs=2, steps_per_epoch=5)
    assert plain[0] == 1.0 and len(plain) == 10 and np.all(np.diff(plain) < 0)
    with pytest.raises(ValueError, match="warmup"):
        cosine_schedule(1.0, 0.0, epochs=1, steps_per_epoch=10, warmup_epochs=2)
