"""Tests for the batched SwAV multi-crop augmentation (swav.data.multicrop)."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav.data.multicrop import EvalTransform, MultiCrop, slice_params

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
LUMA = (0.2989, 0.587, 0.114)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def no_photo(**kw):
    """Module with every photometric op switched off (crop + flip + normalise only)."""
    base = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    base.update(kw)
    return base


def unnorm(x, mean=MEAN3, std=STD3):
    c = x.shape[1]
    return x * torch.tensor(std[:c]).view(1, c, 1, 1) + torch.tensor(mean[:c]).view(1, c, 1, 1)


def hist_uniform(values, lo, hi, bins=10, tol=0.02):
    h = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(lo, hi))[0] / len(values)
    assert np.all(np.abs(h - 1.0 / bins) < tol), h


# ------------------------------------------------------------------------------------------
# parameter statistics
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats():
    mc = MultiCrop([32, 16], [2, 2], [0.05, 0.14], [0.5, 1.0])
    n = 5000  # 20k crops
    p = mc.sample_params(n, gen(1))
    big = torch.tensor([[1000, 1000]]).expand(n, 2)
    cp_big = mc.concrete_params(big, p)
    sizes = torch.stack([torch.randint(5, 61, (n,), generator=gen(2)), torch.randint(5, 61, (n,), generator=gen(3))], 1)
    cp_small = mc.concrete_params(sizes, p)
    return mc, p, cp_big, sizes, cp_small


def test_sample_params_layout(stats):
    mc, p, *_ = stats
    assert set(p) == {"rrc", "pos", "flip", "jitter", "factors", "order", "gray", "blur", "sigma"}
    for v in p.values():
        assert v.shape[:2] == (5000, 4) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) < 1.0
    assert p["rrc"].shape == (5000, 4, 10, 2)
    # independent of image sizes, fixed number of draws: a fresh generator gives the same draws
    q = mc.sample_params(5000, gen(1))
    assert all(torch.equal(p[k], q[k]) for k in p)
    s = slice_params(p, 10, 20)
    assert all(torch.equal(s[k], p[k][10:20]) for k in p)


def test_area_and_ratio_distribution(stats):
    _, _, cp, _, _ = stats
    b = cp["boxes"][:, :2].reshape(-1, 4).double()  # group 0: scale (0.05, 0.5) -> first trial always fits
    assert (cp["trial"][:, :2] == 0).all()
    frac = (b[:, 2] * b[:, 3] / 1e6).numpy()
    ratio = (b[:, 3] / b[:, 2]).numpy()
    assert frac.min() >= 0.05 * 0.99 and frac.max() <= 0.5 * 1.01
    assert ratio.min() >= 0.75 * 0.99 and ratio.max() <= 4 / 3 * 1.01
    hist_uniform(frac, 0.05, 0.5)
    hist_uniform(np.log(ratio), math.log(3 / 4), math.log(4 / 3), bins=8)
    # positions: uniform over the free range
    y0 = cp["boxes"][:, :2, 0].reshape(-1).double()
    hist_uniform((y0 / (1000 - b[:, 2] + 1)).numpy(), 0, 1)
    # group 1: scale (0.14, 1.0), some trials fail; accepted crops still obey the bounds
    b1 = cp["boxes"][:, 2:].reshape(-1, 4).double()
    frac1 = b1[:, 2] * b1[:, 3] / 1e6
    assert frac1.min() >= 0.14 * 0.99 and frac1.max() <= 1.0
    assert (cp["trial"][:, 2:] > 0).any()


def test_boxes_inside_nonsquare_padded_images(stats):
    _, _, _, sizes, cp = stats
    b = cp["boxes"]
    h, w = sizes[:, None, 0], sizes[:, None, 1]
    assert (b[..., 0] >= 0).all() and (b[..., 1] >= 0).all()
    assert (b[..., 2] >= 1).all() and (b[..., 3] >= 1).all()
    assert (b[..., 0] + b[..., 2] <= h).all() and (b[..., 1] + b[..., 3] <= w).all()
    fb = cp["trial"] == -1
    assert fb.any() and (~fb).any()


def tv_get_params(h, w, scale, u_rrc, u_pos):
    """Scalar re-statement of torchvision's RandomResizedCrop.get_params on given uniforms."""
    area = h * w
    lr = (math.log(3 / 4), math.log(4 / 3))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u_rrc[t, 0]))
        ar = math.exp(lr[0] + (lr[1] - lr[0]) * float(u_rrc[t, 1]))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return min(int(float(u_pos[0]) * (h - ch + 1)), h - ch), min(int(float(u_pos[1]) * (w - cw + 1)), w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * 4 / 3))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def test_boxes_match_torchvision_algorithm(stats):
    mc, p, _, sizes, cp = stats
    sizes = sizes.clone()
    sizes[:50] = torch.tensor([5, 100])  # extreme aspect: always the fallback
    cp = mc.concrete_params(sizes, p)
    for i in range(0, 400):
        for k in range(4):
            g = 0 if k < 2 else 1
            ref = tv_get_params(int(sizes[i, 0]), int(sizes[i, 1]), (mc.min_scale_crops[g], mc.max_scale_crops[g]),
                                p["rrc"][i, k], p["pos"][i, k])
            assert tuple(cp["boxes"][i, k].tolist()) == ref, (i, k)
    assert (cp["trial"][:50, 2:] == -1).all() and (cp["trial"][:50, :2] >= 0).any()


def test_flag_rates_factors_sigma_order(stats):
    mc, _, cp, _, _ = stats
    for key, rate in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)]:
        assert abs(cp[key].float().mean().item() - rate) < 0.015, key
    f = cp["factors"].reshape(-1, 4)
    for j, (lo, hi) in enumerate([(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        assert f[:, j].min() >= lo and f[:, j].max() <= hi
        hist_uniform(f[:, j].numpy(), lo, hi)
    s = cp["sigma"].reshape(-1)
    assert s.min() >= 0.1 and s.max() <= 2.0
    hist_uniform(s.numpy(), 0.1, 2.0)
    o = cp["order"].reshape(-1, 4)
    assert torch.equal(o.sort(-1).values, torch.arange(4).expand_as(o))
    # each op at each position ~1/4 of the time
    for op in range(4):
        pos_rate = torch.stack([(o[:, q] == op).float().mean() for q in range(4)])
        assert (pos_rate - 0.25).abs().max() < 0.02


def test_one_channel_factors_are_noops():
    mc = MultiCrop([8], [1], [0.5], [1.0], in_chans=1, mean=(0.5,), std=(0.5,))
    cp = mc.concrete_params(torch.tensor([[8, 8]]).expand(100, 2), mc.sample_params(100, gen()))
    assert (cp["factors"][..., 2] == 1).all() and (cp["factors"][..., 3] == 0).all() and not cp["gray"].any()


# ------------------------------------------------------------------------------------------
# forward faithful to the params
# ------------------------------------------------------------------------------------------
def coord_images(n, hp, wp, sizes, pad_value=255):
    """R = y, G = x (true-image pixels), B = 7; padding = pad_value."""
    y = torch.arange(hp).view(hp, 1).expand(hp, wp)
    x = torch.arange(wp).view(1, wp).expand(hp, wp)
    img = torch.stack([y, x, torch.full_like(y, 7)]).to(torch.uint8).expand(n, 3, hp, wp).clone()
    for i in range(n):  # test-side loop only
        h, w = sizes[i].tolist()
        img[i, :, h:, :] = pad_value
        img[i, :, :, w:] = pad_value
    return img


def test_crop_lands_on_box_and_flip_mirrors():
    n, hp, wp, size = 64, 90, 120, 24
    sizes = torch.stack([torch.randint(30, 91, (n,), generator=gen(4)), torch.randint(30, 121, (n,), generator=gen(5))], 1)
    img = coord_images(n, hp, wp, sizes)
    kw = dict(size_crops=[size, 12], nmb_crops=[2, 1], min_scale_crops=[0.05, 0.05], max_scale_crops=[1.0, 0.3])
    mc = MultiCrop(**kw, **no_photo())
    p = mc.sample_params(n, gen(6))
    out = mc(img, sizes, p)
    cp = mc.concrete_params(sizes, p)
    assert [tuple(o.shape) for o in out] == [(n, 3, size, size)] * 2 + [(n, 3, 12, 12)]
    assert all(o.dtype == torch.float32 for o in out)
    for k, o in enumerate(out):
        v = unnorm(o) * 255
        s = o.shape[-1]
        y0, x0, h, w = [t.double().view(n, 1) for t in cp["boxes"][:, k].unbind(-1)]
        ii = torch.arange(s, dtype=torch.float64).view(1, s)
        ey = (y0 + (ii + 0.5) * h / s - 0.5).clamp(min=y0, max=y0 + h - 1)  # crop-then-resize sample positions
        ex = (x0 + (ii + 0.5) * w / s - 0.5).clamp(min=x0, max=x0 + w - 1)
        # away from the crop border (where the filter is truncated) linear ramps are reproduced:
        # exactly when upscaling (plain bilinear), to within the centroid shift of the sampled
        # antialiasing triangle filter when downscaling
        inner = slice(3, s - 3)
        tol_y = torch.where(h <= s, 2e-3, 0.1)
        tol_x = torch.where(w <= s, 2e-3, 0.1)
        assert ((v[:, 0, inner, 5].double() - ey[:, inner]).abs() <= tol_y).all()
        assert ((v[:, 1, 5, inner].double() - ex[:, inner]).abs() <= tol_x).all()
        assert torch.allclose(v[:, 2], torch.tensor(7.0), atol=1e-3)
        # everything stays inside the box (and so never touches the padding)
        assert (v[:, 0] >= y0.view(n, 1, 1) - 1e-3).all() and (v[:, 0] <= (y0 + h - 1).view(n, 1, 1) + 1e-3).all()
        assert (v[:, 1] >= x0.view(n, 1, 1) - 1e-3).all() and (v[:, 1] <= (x0 + w - 1).view(n, 1, 1) + 1e-3).all()
    flipped = MultiCrop(**kw, **no_photo(flip_prob=1.0))(img, sizes, p)
    for a, b in zip(out, flipped):
        assert torch.equal(a.flip(-1), b)


def test_padding_never_sampled_full_pipeline():
    n, hp, wp = 128, 40, 40
    sizes = torch.stack([torch.randint(6, 41, (n,), generator=gen(7)), torch.randint(6, 41, (n,), generator=gen(8))], 1)
    img = torch.randint(0, 101, (n, 3, hp, wp), generator=gen(9)).to(torch.uint8)
    for i in range(n):
        img[i, :, sizes[i, 0]:] = 255
        img[i, :, :, sizes[i, 1]:] = 255
    # jitter off (brightness could push values above 100); flips, grayscale and blur on
    mc = MultiCrop([16, 8], [2, 3], [0.14, 0.05], [1.0, 0.14], flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.5, blur_prob=0.5)
    out = mc(img, sizes, mc.sample_params(n, gen(10)))
    for o in out:
        assert unnorm(o).max() * 255 <= 100 + 1e-3


def test_zero_probability_is_exact_crop_and_normalize():
    n = 16
    img = torch.randint(0, 256, (n, 3, 20, 20), generator=gen(11)).to(torch.uint8)
    mc = MultiCrop([20], [2], [1.0], [1.0], **no_photo())  # square image, scale 1 -> identity box
    out = mc(img, None, mc.sample_params(n, gen(12)))
    ref = (img.float() / 255 - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    for o in out:
        assert torch.allclose(o, ref, atol=1e-5)


def test_grayscale_equal_channels():
    n = 32
    img = torch.randint(0, 256, (n, 3, 24, 24), generator=gen(13)).to(torch.uint8)
    mc = MultiCrop([12], [2], [0.3], [1.0], mean=(0.5,) * 3, std=(0.25,) * 3, grayscale_prob=1.0, jitter_prob=0.5, blur_prob=0.5)
    for o in mc(img, None, mc.sample_params(n, gen(14))):
        assert torch.allclose(o[:, 0], o[:, 1], atol=1e-5) and torch.allclose(o[:, 0], o[:, 2], atol=1e-5)
        assert o[:, 0].std() > 0.1


def test_brightness_on_constant_image():
    n, v = 256, 120
    img = torch.full((n, 3, 10, 10), v, dtype=torch.uint8)
    mc = MultiCrop([10], [1], [0.5], [1.0], mean=(0.0,) * 3, std=(1.0,) * 3, **no_photo(jitter_prob=0.8))
    p = mc.sample_params(n, gen(15))
    out = mc(img, None, p)[0]
    cp = mc.concrete_params(torch.tensor([[10, 10]]).expand(n, 2), p)
    # grey constant image: saturation and hue are identities, contrast nearly (torchvision's luma
    # weights sum to 0.9999), brightness scales
    f = torch.where(cp["jitter"][:, 0], cp["factors"][:, 0, 0], torch.ones(n))
    expect = (f * v / 255).clamp(0, 1).view(n, 1, 1, 1).expand_as(out)
    assert torch.allclose(out, expect, atol=3e-4)
    assert (f != 1).sum() > 150


def ref_jitter(x, order, fac):
    """Per-image reference of torchvision ColorJitter on a float (3, H, W) image; hue via colorsys."""
    x = x.clone().double()
    for op in order:
        f = float(fac[op])
        gray = LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2]
        if op == 0:
            x = (f * x).clamp(0, 1)
        elif op == 1:
            x = (f * x + (1 - f) * gray.mean()).clamp(0, 1)
        elif op == 2:
            x = (f * x + (1 - f) * gray).clamp(0, 1)
        else:
            arr = x.permute(1, 2, 0).reshape(-1, 3).tolist()
            out = []
            for r, g, b in arr:
                h, s, v = colorsys.rgb_to_hsv(r, g, b)
                out.append(colorsys.hsv_to_rgb((h + f) % 1.0, s, v))
            x = torch.tensor(out, dtype=torch.float64).reshape(x.shape[1], x.shape[2], 3).permute(2, 0, 1)
    return x


def test_color_jitter_matches_reference_random_order():
    n = 48
    img = torch.randint(0, 256, (n, 3, 6, 6), generator=gen(16)).to(torch.uint8)
    mc = MultiCrop([6], [1], [1.0], [1.0], mean=(0.0,) * 3, std=(1.0,) * 3, **no_photo(jitter_prob=1.0))
    p = mc.sample_params(n, gen(17))
    out = mc(img, None, p)[0]
    cp = mc.concrete_params(torch.tensor([[6, 6]]).expand(n, 2), p)
    assert (cp["boxes"][:, 0] == torch.tensor([0, 0, 6, 6])).all()
    orders = set()
    for i in range(n):
        order = cp["order"][i, 0].tolist()
        orders.add(tuple(order))
        ref = ref_jitter(img[i].double() / 255, order, cp["factors"][i, 0])
        assert torch.allclose(out[i].double(), ref, atol=1e-4), (i, order)
    assert len(orders) >= 15


def test_contrast_one_channel_uses_image_mean():
    n = 64
    img = torch.randint(0, 256, (n, 1, 8, 8), generator=gen(18)).to(torch.uint8)
    mc = MultiCrop([8], [1], [1.0], [1.0], mean=(0.0,), std=(1.0,), in_chans=1, **no_photo(jitter_prob=1.0))
    p = mc.sample_params(n, gen(19))
    out = mc(img, None, p)[0]
    cp = mc.concrete_params(torch.tensor([[8, 8]]).expand(n, 2), p)
    for i in range(n):
        x = img[i].double() / 255
        for op in cp["order"][i, 0].tolist():
            f = float(cp["factors"][i, 0, op])
            if op == 0:
                x = (f * x).clamp(0, 1)
            elif op == 1:
                x = (f * x + (1 - f) * x.mean()).clamp(0, 1)
        assert torch.allclose(out[i].double(), x, atol=1e-5)


def test_blur_constant_and_delta():
    n, s = 64, 25
    const = torch.full((n, 3, s, s), 77, dtype=torch.uint8)
    mc = MultiCrop([s], [1], [1.0], [1.0], mean=(0.0,) * 3, std=(1.0,) * 3, **no_photo(blur_prob=1.0))
    p = mc.sample_params(n, gen(20))
    assert torch.allclose(mc(const, None, p)[0], torch.tensor(77 / 255), atol=1e-5)
    delta = torch.zeros((n, 3, s, s), dtype=torch.uint8)
    delta[:, :, s // 2, s // 2] = 255
    out = mc(delta, None, p)[0].double()
    sig = mc.concrete_params(torch.tensor([[s, s]]).expand(n, 2), p)["sigma"][:, 0].double()
    assert torch.allclose(out.sum((-2, -1)), torch.ones(n, 3, dtype=torch.float64), atol=1e-4)
    d = torch.arange(s, dtype=torch.float64) - s // 2
    for i in range(n):
        r = math.ceil(3 * sig[i])
        k = torch.exp(-d ** 2 / (2 * sig[i] ** 2)) * (d.abs() <= r)
        k = k / k.sum()
        assert torch.allclose(out[i, 0], torch.outer(k, k), atol=1e-5)
        if sig[i] > 0.8:  # empirical variance ~ sigma^2 (truncated at 3 sigma; discretisation for small sigma)
            var = (out[i, 0].sum(0) * d ** 2).sum()
            assert abs(var.sqrt() - sig[i]) < 0.05 * sig[i]


def test_blur_reflect_padding_on_small_crops():
    n = 8
    img = torch.randint(0, 256, (n, 1, 5, 5), generator=gen(21)).to(torch.uint8)
    mc = MultiCrop([5], [1], [1.0], [1.0], mean=(0.0,), std=(1.0,), in_chans=1, **no_photo(blur_prob=1.0))
    out = mc(img, None, mc.sample_params(n, gen(22)))[0]
    assert torch.allclose(out.mean((1, 2, 3)), (img.float() / 255).mean((1, 2, 3)), atol=0.08)
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


# ------------------------------------------------------------------------------------------
# determinism, slicing, 1 channel, channels_last
# ------------------------------------------------------------------------------------------
def test_determinism_and_slicing():
    n, k = 24, 10
    img = torch.randint(0, 256, (n, 3, 32, 40), generator=gen(23)).to(torch.uint8)
    sizes = torch.stack([torch.randint(12, 33, (n,), generator=gen(24)), torch.randint(12, 41, (n,), generator=gen(25))], 1)
    mc = MultiCrop([16, 8], [2, 2], [0.14, 0.05], [1.0, 0.14])
    a = mc(img, sizes, mc.sample_params(n, gen(26)))
    b = mc(img, sizes, mc.sample_params(n, gen(26)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    p = mc.sample_params(n, gen(26))
    lo = mc(img[:k], sizes[:k], slice_params(p, 0, k))
    hi = mc(img[k:], sizes[k:], slice_params(p, k, n))
    for full, x, y in zip(a, lo, hi):
        assert torch.allclose(full, torch.cat([x, y]), atol=1e-6, rtol=0)
    c = mc(img, sizes, mc.sample_params(n, gen(27)))
    assert not torch.allclose(a[0], c[0])


def test_one_channel_fashion_mnist_preset():
    n = 32
    img = torch.randint(0, 256, (n, 1, 28, 28), generator=gen(28)).to(torch.uint8)
    mc = MultiCrop([28, 16], [2, 4], [0.14, 0.05], [1.0, 0.14], mean=(0.286,), std=(0.353,), in_chans=1, channels_last=True)
    out = mc(img, None, mc.sample_params(n, gen(29)))
    assert mc.n_crops == 6 and len(out) == 6
    assert [tuple(o.shape) for o in out] == [(n, 1, 28, 28)] * 2 + [(n, 1, 16, 16)] * 4
    for o in out:
        assert torch.isfinite(o).all()
        u = o * 0.353 + 0.286
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
        assert o.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------
# antialiasing and eval transform
# ------------------------------------------------------------------------------------------
def test_downscaled_checkerboard_is_grey_not_aliased():
    n, big, s = 4, 224, 30  # non-integer factor 7.47
    yy, xx = torch.meshgrid(torch.arange(big), torch.arange(big), indexing="ij")
    board = (((yy + xx) % 2) * 255).to(torch.uint8).expand(n, 3, big, big).contiguous()
    mc = MultiCrop([s], [1], [1.0], [1.0], mean=(0.0,) * 3, std=(1.0,) * 3, **no_photo())
    out = mc(board, None, mc.sample_params(n, gen(30)))[0]
    assert (out - 0.5).abs().max() < 0.03
    # plain (non-antialiased) bilinear point-sampling of the same board aliases badly
    naive = F.interpolate(board.float() / 255, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
    assert (naive - 0.5).abs().max() > 0.4
    # also for a random RRC crop of a 1-px stripe pattern at a non-integer scale
    stripes = ((xx % 2) * 255).to(torch.uint8).expand(n, 3, big, big).contiguous()
    mc2 = MultiCrop([s], [1], [0.3], [1.0], mean=(0.0,) * 3, std=(1.0,) * 3, **no_photo())
    out2 = mc2(stripes, None, mc2.sample_params(n, gen(31)))[0]
    assert (out2 - 0.5).abs().max() < 0.1


def test_eval_transform_shapes_and_centering():
    n = 3
    sizes = torch.tensor([[60, 80], [80, 60], [50, 50]])
    img = coord_images(n, 80, 80, sizes)
    et = EvalTransform(32, MEAN3, STD3, resize=False)
    out = et(img, sizes)
    assert out.shape == (n, 3, 32, 32)
    v = unnorm(out) * 255
    for i in range(n):
        h, w = sizes[i].tolist()
        top, left = round((h - 32) / 2), round((w - 32) / 2)
        assert torch.allclose(v[i, 0, :, 0], torch.arange(top, top + 32, dtype=torch.float32), atol=1e-3)
        assert torch.allclose(v[i, 1, 0, :], torch.arange(left, left + 32, dtype=torch.float32), atol=1e-3)
    et = EvalTransform(28, MEAN3, STD3, resize=True, channels_last=True)
    out = et(img, sizes)
    assert out.shape == (n, 3, 28, 28) and out.is_contiguous(memory_format=torch.channels_last)
    v = unnorm(out) * 255
    for i in range(n):
        h, w = sizes[i].tolist()
        # centre of the output lands on the centre of the true image, symmetric
        cy = (v[i, 0, 13, 14] + v[i, 0, 14, 14]) / 2
        cx = (v[i, 1, 14, 13] + v[i, 1, 14, 14]) / 2
        assert abs(cy - (h - 1) / 2) < 0.6 and abs(cx - (w - 1) / 2) < 0.6
        # shorter side resized to 32, longer to int(32 * long / short) (torchvision Resize(int))
        new_h = 32 if h <= w else int(32 * h / w)
        new_w = 32 if w <= h else int(32 * w / h)
        assert abs((v[i, 0, 20, 14] - v[i, 0, 8, 14]) / 12 - h / new_h) < 0.02
        assert abs((v[i, 1, 14, 20] - v[i, 1, 14, 8]) / 12 - w / new_w) < 0.02
    assert EvalTransform(28, (0.5,), (0.5,))(img[:, :1]).shape == (n, 1, 28, 28)


@pytest.mark.parametrize("chans", [3, 1])
def test_sync_free_path_matches_cpu_path(chans):
    n = 16
    sizes = torch.stack([torch.randint(20, 49, (n,), generator=gen(32)), torch.randint(20, 49, (n,), generator=gen(33))], 1)
    img = torch.randint(0, 256, (n, chans, 48, 48), generator=gen(34)).to(torch.uint8)
    mc = MultiCrop([24, 12], [1, 2], [0.14, 0.05], [1.0, 0.14], in_chans=chans, mean=MEAN3[:chans], std=STD3[:chans])
    p = mc.sample_params(n, gen(35))
    assert mc.sync_free is None
    mc.sync_free = False  # windows + subsets (the CPU default)
    a = mc(img, sizes, p)
    mc.sync_free = True  # whole padded image, masked ops on every sample (the CUDA default)
    b = mc(img, sizes, p)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=5e-5)  # float rounding of the shifted sample positions only


# ------------------------------------------------------------------------------------------
# random erasing
# ------------------------------------------------------------------------------------------
def tv_erase_params(side, scale, u_trials, u_pos):
    """Scalar re-statement of torchvision's RandomErasing.get_params (ratio 0.3-3.3) on given
    uniforms, for a side x side crop; None when no trial fits."""
    lr = (math.log(0.3), math.log(3.3))
    for t in range(10):
        target = side * side * (scale[0] + (scale[1] - scale[0]) * float(u_trials[t, 0]))
        ar = math.exp(lr[0] + (lr[1] - lr[0]) * float(u_trials[t, 1]))
        h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if h < side and w < side:
            return min(int(float(u_pos[0]) * (side - h + 1)), side - h), min(int(float(u_pos[1]) * (side - w + 1)), side - w), h, w
    return None


def test_erasing_sets_torchvisions_box_to_the_mean_and_leaves_the_rest():
    """erase_prob 1: each crop equals the crop without erasing outside one box, 0 inside it; the box
    is torchvision's RandomErasing on the same uniforms. The draws of the other ops are those of
    a module without erasing (its uniforms come from a second call)."""
    n = 64
    img = torch.randint(1, 256, (n, 1, 28, 28), generator=gen(40)).to(torch.uint8)
    kw = dict(in_chans=1, mean=(0.0,), std=(1.0,), flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    plain = MultiCrop([28, 16], [2, 3], [0.5, 0.1], [1.0, 0.3], **kw)
    erasing = MultiCrop([28, 16], [2, 3], [0.5, 0.1], [1.0, 0.3], erase_prob=1.0, erase_scale=(0.02, 0.6), **kw)
    p_plain, p = plain.sample_params(n, gen(41)), erasing.sample_params(n, gen(41))
    assert set(p) - set(p_plain) == {"erase", "erase_trials", "erase_pos"}
    assert all(torch.equal(p_plain[k], p[k]) for k in p_plain)
    ref, out = plain(img, None, p_plain), erasing(img, None, p)
    sides = [28, 28, 16, 16, 16]
    erased = 0
    for k, (r, o, side) in enumerate(zip(ref, out, sides)):
        assert (r > 0).all()  # no pixel is 0 before erasing (images in 1..255, mean 0)
        for i in range(n):
            box = tv_erase_params(side, (0.02, 0.6), p["erase_trials"][i, k], p["erase_pos"][i, k])
            mask = torch.zeros(side, side, dtype=torch.bool)
            if box is not None:
                y0, x0, h, w = box
                mask[y0:y0 + h, x0:x0 + w] = True
                erased += h * w > 0
            assert torch.equal(o[i, 0] == 0, mask), (i, k, box)
            assert torch.equal(o[i, 0][~mask], r[i, 0][~mask])
    assert erased > 0.9 * n * len(sides)


def test_erasing_probability_and_validation():
    n = 4000
    mc = MultiCrop([16], [2], [0.5], [1.0], in_chans=1, mean=(0.5,), std=(0.25,), erase_prob=0.3)
    cp = mc.concrete_params(torch.tensor([[28, 28]]).expand(n, 2), mc.sample_params(n, gen(42)))
    rate = cp["erase"].float().mean().item()
    # binomial: 2n crops, sd = sqrt(0.3 * 0.7 / 2n) = 0.0051; 5 sd (a trial never fits: rarer still)
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / (2 * n)), rate
    assert "erase" not in MultiCrop([16], [2], [0.5], [1.0]).sample_params(2, gen(0))
    for bad in ((0.0, 0.3), (0.4, 0.3), (0.1, 1.0)):
        with pytest.raises(ValueError, match="erase scale"):
            MultiCrop([16], [2], [0.5], [1.0], erase_prob=0.5, erase_scale=bad)


@pytest.mark.parametrize("sync_free", [False, True])
def test_channels_last_batches_give_the_same_crops(sync_free):
    """The loader's batches lie in (N, H, W, C) memory (no transposition in the workers): the crops
    (windows and whole-image resampling, the eval transform) equal those of the same batch in NCHW."""
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(6, 3, 50, 70, generator=g) * 255).to(torch.uint8)
    sizes = torch.tensor([[50, 70], [40, 70], [50, 33], [17, 21], [50, 64], [45, 45]])
    mc = MultiCrop([32, 12], [2, 3], [0.3, 0.05], [1.0, 0.3], blur_prob=0.5)
    mc.sync_free = sync_free
    params = mc.sample_params(6, torch.Generator().manual_seed(4))
    nhwc = images.contiguous(memory_format=torch.channels_last)
    assert nhwc.stride(1) == 1 and torch.equal(nhwc, images)
    for a, b in zip(mc(images, sizes, params), mc(nhwc, sizes, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ev = EvalTransform(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(ev(images, sizes), ev(nhwc, sizes), rtol=1e-5, atol=1e-5)
