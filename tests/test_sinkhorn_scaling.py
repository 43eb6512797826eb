"""The scaling form of Sinkhorn (CPU default where safe) equals the log-domain form, in one process
and across two (gloo), and hands over to the log domain where exp would underflow."""
import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn, sinkhorn_reference

sk = importlib.import_module("swav.sinkhorn")  # the module (swav.sinkhorn is also a function name)


def cosine_scores(b, k, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return (z @ c.t()).to(dtype)


@pytest.mark.parametrize("b,k", [(64, 30), (256, 300), (700, 1000)])  # the last spans several row blocks
@pytest.mark.parametrize("iters", [1, 3])
def test_scaling_form_equals_log_domain(b, k, iters):
    s = cosine_scores(b, k, seed=b + k)
    fast = sinkhorn(s, 0.05, iters, linear=True)
    log = sinkhorn(s, 0.05, iters, linear=False)
    assert (fast - log).abs().max() <= 1e-6
    assert (fast.double() - sinkhorn_reference(s.double(), 0.05, iters)).abs().max() <= 1e-6
    torch.testing.assert_close(fast.sum(1), torch.ones(b), atol=1e-5, rtol=0)


def test_default_is_scaling_on_cpu_and_leaves_the_scores_alone(monkeypatch):
    s = cosine_scores(128, 40)
    before = s.clone()
    called = []
    real = sk._sinkhorn_scaling
    monkeypatch.setattr(sk, "_sinkhorn_scaling", lambda *a, **kw: called.append(1) or real(*a, **kw))
    sinkhorn(s, 0.05, 3)
    assert called and torch.equal(s, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaling_form_with_half_precision_scores(dtype):
    s = cosine_scores(256, 300, seed=3, dtype=dtype)
    q = sinkhorn(s, 0.05, 3, linear=True)
    assert q.dtype == torch.float32
    assert (q.double() - sinkhorn_reference(s.double(), 0.05, 3)).abs().max() <= 1e-5


@pytest.mark.parametrize("eps", [0.01, 0.005])
def test_small_epsilon_hands_over_to_the_log_domain(eps, monkeypatch):
    s = cosine_scores(64, 30, seed=1)
    monkeypatch.setattr(sk, "_sinkhorn_scaling", lambda *a, **kw: pytest.fail("scaling form used"))
    q = sinkhorn(s, eps, 3, linear=True)
    assert torch.isfinite(q).all()
    assert (q.double() - sinkhorn_reference(s.double(), eps, 3)).abs().max() <= 1e-5


def _rank(rank, world, port, out_dir, eps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        s = cosine_scores(96, 50, seed=7)
        half = s.shape[0] // world
        q = sinkhorn(s[rank * half:(rank + 1) * half], eps, 3)  # CPU default: the scaling form where safe
        torch.save(q, os.path.join(out_dir, f"q{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("eps", [0.05, 0.005])
def test_two_ranks_equal_one(tmp_path, eps):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path), eps), nprocs=2, join=True)
    both = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(2)])
    one = sinkhorn(cosine_scores(96, 50, seed=7), eps, 3, linear=False)
    assert (both - one).abs().max() <= 1e-5
