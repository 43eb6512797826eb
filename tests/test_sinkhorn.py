import pytest
import torch
import torch.nn.functional as F

from swav.sinkhorn import sinkhorn, sinkhorn_reference


def cosine_scores(b, k, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    z[: min(b, k) // 2] = c[: min(b, k) // 2]  # some samples sit on a prototype: scores of exactly 1
    return (z @ c.t()).to(dtype)


@pytest.mark.parametrize("eps", [0.01, 0.005])
def test_small_epsilon_matches_float64_reference(eps):
    s = cosine_scores(64, 30, seed=1)
    q = sinkhorn(s, eps, 3)
    ref = sinkhorn_reference(s.double(), eps, 3)
    assert torch.isfinite(q).all()
    assert torch.isfinite(ref).all()
    # the plain float32 form is broken there (overflow or 0/0) — the reason for the log domain
    assert not torch.isfinite(sinkhorn_reference(s, eps, 3)).all()
    assert (q.double() - ref).abs().max().item() <= 1e-5


def test_matches_plain_form_at_paper_epsilon():
    s = cosine_scores(128, 50, seed=2)
    assert (sinkhorn(s, 0.05, 3) - sinkhorn_reference(s, 0.05, 3)).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_give_float32_codes(dtype):
    s = cosine_scores(256, 300, seed=3, dtype=dtype)
    q = sinkhorn(s, 0.05, 3)
    assert q.dtype == torch.float32
    assert not torch.isnan(q).any()
    ref = sinkhorn_reference(s.double(), 0.05, 3)  # same half-precision inputs, evaluated exactly
    assert (q.double() - ref).abs().max() <= 1e-5


def test_float64_stays_float64():
    assert sinkhorn(cosine_scores(8, 4).double()).dtype == torch.float64


@pytest.mark.parametrize("seed", range(5))
def test_rows_sum_to_one(seed):
    g = torch.Generator().manual_seed(seed)
    b, k = int(torch.randint(2, 200, (1,), generator=g)), int(torch.randint(2, 300, (1,), generator=g))
    s = torch.randn(b, k, generator=g) * 3
    q = sinkhorn(s, 0.05 * (seed + 1), 3)
    assert q.shape == (b, k)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(b), atol=1e-5, rtol=0)


def test_columns_approach_equipartition_as_iterations_grow():
    s = cosine_scores(200, 20, seed=4)
    errors = []
    for iters in (1, 3, 10, 100):
        q = sinkhorn(s, 0.1, iters)
        errors.append((q.sum(0) - 200 / 20).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * 10  # within 0.1% of B/K = 10


def test_invalid_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn(torch.zeros(2, 3), 0.05, 0)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.zeros(2, 3, 4))
