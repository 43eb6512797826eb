"""Property-based tests (hypothesis) of the numerical core on any input shape, dtype and extreme
value: Sinkhorn codes, the swapped-prediction loss, the multi-crop augmentation and the eval
transform. Derandomized (the same examples on every run, no example database written) and bounded
so that the file stays well under 30 s; tests/test_sinkhorn.py etc. check exact values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swav.data.multicrop import EvalTransform, MultiCrop
from swav.loss import swapped_prediction_loss, swav_loss
from swav.sinkhorn import sinkhorn

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=30)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def score_matrices(draw, max_b=48, max_k=40):
    """(B, K) scores: a random normal matrix times a magnitude up to 1e4, with optional constant
    rows/columns and +-1e4 spikes, in any float dtype (fp16 holds +-1e4)."""
    b, k = draw(st.integers(1, max_b)), draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 1e-6, 1.0, 10.0, 1e3, 1e4]))
    x = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    pattern = draw(st.sampled_from(["plain", "spikes", "constant rows", "constant columns", "one hot"]))
    if pattern == "spikes":
        mask = torch.rand(b, k, generator=g) < 0.1
        x = torch.where(mask, torch.sign(torch.randn(b, k, generator=g, dtype=torch.float64)) * 1e4, x)
    elif pattern == "constant rows":
        x = x[:, :1].expand(b, k).clone()
    elif pattern == "constant columns":
        x = x[:1, :].expand(b, k).clone()
    elif pattern == "one hot":
        x = torch.full((b, k), -1e4, dtype=torch.float64)
        x[torch.arange(b), torch.randint(0, k, (b,), generator=g)] = 1e4
    return x.clamp(-1e4, 1e4).to(draw(st.sampled_from(DTYPES)))


epsilons = st.floats(min_value=math.log(1e-3), max_value=math.log(10.0)).map(math.exp)


@FAST
@given(scores=score_matrices(), eps=epsilons, iterations=st.integers(1, 6))
def test_sinkhorn_codes_are_distributions(scores, eps, iterations):
    q = sinkhorn(scores, eps, iterations)
    assert q.shape == scores.shape
    assert q.dtype == (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(q).all()
    assert (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(q.shape[0], dtype=q.dtype), atol=1e-5)


@FAST
@given(scores=score_matrices(max_b=24, max_k=24), eps=epsilons)
def test_sinkhorn_equipartitions_given_enough_iterations(scores, eps):
    """With many iterations every prototype gets about B/K of the mass when the scores allow it
    (bounded scores / eps, so that the plan exists at float32 resolution)."""
    s = scores.double()
    if s.abs().max() / eps > 50:
        s = s / (s.abs().max() / eps) * 50
    q = sinkhorn(s, eps, 2000)
    b, k = q.shape
    assert torch.allclose(q.sum(dim=0), torch.full((k,), b / k, dtype=q.dtype), rtol=1e-3, atol=1e-3)


@st.composite
def loss_inputs(draw):
    n_crops = draw(st.integers(2, 5))
    b, k, d = draw(st.integers(1, 12)), draw(st.integers(1, 30)), draw(st.integers(1, 16))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    assign = draw(st.lists(st.integers(0, n_crops - 1), min_size=1, max_size=n_crops, unique=True))
    scale = draw(st.sampled_from([1e-4, 1.0, 100.0, 1e4]))
    scores = (torch.randn(n_crops * b, k, generator=g) * scale).to(draw(st.sampled_from(DTYPES)))
    temperature = draw(st.sampled_from([0.01, 0.05, 0.1, 1.0, 10.0]))
    return scores, assign, b, k, d, temperature, g


@FAST
@given(inputs=loss_inputs(), eps=epsilons)
def test_loss_is_finite_non_negative_with_finite_gradient(inputs, eps):
    scores, assign, b, k, d, temperature, _ = inputs
    scores = scores.detach().requires_grad_()
    codes = [sinkhorn(scores[c * b:(c + 1) * b].detach(), eps, 3) for c in assign]
    loss = swapped_prediction_loss(scores, codes, assign, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-5  # a cross-entropy of distributions: -sum q log p >= 0
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


@FAST
@given(inputs=loss_inputs())
def test_swav_loss_end_to_end_on_unit_embeddings(inputs):
    scores, assign, b, k, d, temperature, g = inputs
    n_crops = scores.shape[0] // b
    z = torch.nn.functional.normalize(torch.randn(n_crops * b, d, generator=g), dim=1).requires_grad_()
    protos = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1).requires_grad_()
    loss, full = swav_loss(z @ protos.t(), z.detach(), protos.detach(), b, assign, temperature=temperature)
    assert torch.isfinite(loss) and loss.item() >= -1e-5
    assert loss.item() <= (math.log(k) + 2 / temperature) * (1 + 1e-5) + 1e-5  # -log p <= log K + 2/tau
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(protos.grad).all()
    assert len(full[0]) == len(assign) and all(q.shape == (b, k) for q in full[0])


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
side = st.one_of(st.just(1), st.integers(1, 4), st.integers(1, 80))


@st.composite
def image_batches(draw, in_chans):
    """uint8 images of any size (1x1, 1xW thin, ...) zero-padded into one batch, or float in [0, 1]."""
    n = draw(st.integers(1, 5))
    sizes = [(draw(side), draw(side)) for _ in range(n)]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    content = draw(st.sampled_from(["noise", "zeros", "white", "checker"]))
    images = torch.zeros(n, in_chans, h, w, dtype=torch.uint8)
    for i, (hi, wi) in enumerate(sizes):
        if content == "noise":
            images[i, :, :hi, :wi] = torch.randint(0, 256, (in_chans, hi, wi), generator=g, dtype=torch.uint8)
        elif content == "white":
            images[i, :, :hi, :wi] = 255
        elif content == "checker":
            images[i, :, :hi, :wi] = ((torch.arange(hi)[:, None] + torch.arange(wi)) % 2 * 255).to(torch.uint8)
    if draw(st.booleans()):
        images = images.float() / 255.0
    return images, torch.tensor(sizes, dtype=torch.int64), g


@st.composite
def multicrops(draw):
    groups = draw(st.integers(1, 3))
    size_crops = [draw(st.integers(1, 40)) for _ in range(groups)]
    nmb = [draw(st.integers(1, 3)) for _ in range(groups)]
    lo = [draw(st.floats(1e-4, 1.0)) for _ in range(groups)]
    hi = [draw(st.floats(x, 1.0)) for x in lo]
    in_chans = draw(st.sampled_from([1, 3]))
    s0 = draw(st.floats(1e-3, 5.0))
    mc = MultiCrop(size_crops, nmb, lo, hi, flip_prob=draw(st.sampled_from([0.0, 0.5, 1.0])),
                   jitter_strength=draw(st.sampled_from([0.0, 0.5, 1.0, 5.0])),
                   jitter_prob=draw(st.sampled_from([0.0, 0.8, 1.0])),
                   grayscale_prob=draw(st.sampled_from([0.0, 1.0])), blur_prob=draw(st.sampled_from([0.0, 1.0])),
                   blur_sigma=(s0, s0 + draw(st.floats(0.0, 5.0))), mean=[0.5] * in_chans,
                   std=[draw(st.sampled_from([1e-3, 0.25, 10.0]))] * in_chans, in_chans=in_chans)
    mc.sync_free = draw(st.sampled_from([None, True]))
    return mc


@SLOW
@given(mc=multicrops(), data=st.data())
def test_multicrop_outputs_are_finite_and_shaped(mc, data):
    images, sizes, g = data.draw(image_batches(mc.in_chans))
    n = images.shape[0]
    crops = mc(images, sizes, mc.sample_params(n, g))
    assert len(crops) == sum(mc.nmb_crops)
    expected = [s for s, k in zip(mc.size_crops, mc.nmb_crops) for _ in range(k)]
    for x, s in zip(crops, expected):
        assert x.shape == (n, mc.in_chans, s, s) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    cp = mc.concrete_params(sizes, mc.sample_params(n, g))
    y0, x0, bh, bw = cp["boxes"].unbind(-1)  # every box lies inside its true image and is not empty
    assert (bh >= 1).all() and (bw >= 1).all() and (y0 >= 0).all() and (x0 >= 0).all()
    assert (y0 + bh <= sizes[:, :1]).all() and (x0 + bw <= sizes[:, 1:]).all()


@SLOW
@given(size=st.integers(1, 48), in_chans=st.sampled_from([1, 3]), resize=st.booleans(), data=st.data())
def test_eval_transform_outputs_are_finite_and_shaped(size, in_chans, resize, data):
    images, sizes, _ = data.draw(image_batches(in_chans))
    x = EvalTransform(size, [0.5] * in_chans, [0.25] * in_chans, resize=resize)(images, sizes)
    assert x.shape == (images.shape[0], in_chans, size, size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_of_nonfinite_scores_is_visible(dtype):
    """A NaN score is not hidden by the codes (the trainer's NaN guard must see it)."""
    s = torch.zeros(4, 3, dtype=dtype)
    s[1, 2] = float("nan")
    assert not torch.isfinite(sinkhorn(s, 0.05, 3)).all()
