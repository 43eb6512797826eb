"""Benchmark: batched MultiCrop (swav.data.multicrop) vs the per-image PIL pipeline of the same
transforms (the official SwAV design: one PIL image at a time).

    python bench/bench_augment.py [--quick]

Prints images/s for both and the speed ratio for two presets on synthetic uint8 images:
``fmnist`` (1 channel, 28 px, 2x28 + 4x16 crops, batch 256) and ``rgb`` (3 channels, padded
variable-size ~160-256 px images, 2x224 + 6x96 crops). For the fmnist preset it also times one
ResNet-18 (small stem) training step on the crops, if ``swav.models`` is available, to put the
augmentation cost in proportion.
"""
from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from swav.data.multicrop import MultiCrop

PRESETS = {
    "fmnist": dict(n=256, chans=1, hw=(28, 28), var=0, size_crops=[28, 16], nmb_crops=[2, 4],
                   min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14], mean=(0.286,), std=(0.353,)),
    "rgb": dict(n=32, chans=3, hw=(256, 256), var=96, size_crops=[224, 96], nmb_crops=[2, 6],
                min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14],
                mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225)),
}


# ------------------------------------------------------------------------------------------
# per-image PIL reference ("official design")
# ------------------------------------------------------------------------------------------
def _rrc_params(h, w, scale, ratio, rng):
    """torchvision RandomResizedCrop.get_params, with Python's RNG."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _pil_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    hh = np.asarray(h, dtype=np.uint8)
    hh = (hh.astype(np.int16) + int(round(shift * 255))).astype(np.uint8)  # wraps mod 256
    return Image.merge("HSV", (Image.fromarray(hh, "L"), s, v)).convert("RGB")


def pil_reference_pipeline(img: Image.Image, rng: random.Random, size_crops, nmb_crops, min_scale_crops,
                           max_scale_crops, mean, std, flip_prob=0.5, jitter_strength=1.0, jitter_prob=0.8,
                           grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0)) -> list[torch.Tensor]:
    """All crops of one PIL image (mode 'L' or 'RGB'), as float (C, S, S) normalised tensors."""
    rgb = img.mode == "RGB"
    s = jitter_strength
    b_rng = (max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    out = []
    w, h = img.size
    for size, nmb, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
        for _ in range(nmb):
            y0, x0, ch, cw = _rrc_params(h, w, (lo, hi), (3 / 4, 4 / 3), rng)
            x = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            if rng.random() < flip_prob:
                x = ImageOps.mirror(x)
            if rng.random() < jitter_prob:
                factors = [rng.uniform(*b_rng) for _ in range(3)] + [rng.uniform(-0.2 * s, 0.2 * s)]
                order = list(range(4))
                rng.shuffle(order)
                for op in order:
                    if op == 0:
                        x = ImageEnhance.Brightness(x).enhance(factors[0])
                    elif op == 1:
                        x = ImageEnhance.Contrast(x).enhance(factors[1])
                    elif op == 2 and rgb:
                        x = ImageEnhance.Color(x).enhance(factors[2])
                    elif op == 3 and rgb:
                        x = _pil_hue(x, factors[3])
            if rgb and rng.random() < grayscale_prob:
                x = x.convert("L").convert("RGB")
            if rng.random() < blur_prob:
                x = x.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*blur_sigma)))
            t = torch.from_numpy(np.array(x, dtype=np.uint8, copy=True))
            t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
            out.append((t.float().div_(255) - mean_t) / std_t)
    return out


# ------------------------------------------------------------------------------------------
# synthetic data and timing
# ------------------------------------------------------------------------------------------
def synthetic_batch(n, chans, hw, var, seed=0):
    """Smooth-ish random uint8 images (zero-padded, true sizes in [hw - var, hw])."""
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    low = torch.rand(n, chans, max(H // 4, 2), max(W // 4, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    img = (img * 200 + torch.rand(n, chans, H, W, generator=g) * 55).to(torch.uint8)
    if var:
        sizes = torch.stack([torch.randint(H - var, H + 1, (n,), generator=g), torch.randint(W - var, W + 1, (n,), generator=g)], 1)
        for i in range(n):  # data preparation only
            img[i, :, sizes[i, 0]:] = 0
            img[i, :, :, sizes[i, 1]:] = 0
    else:
        sizes = torch.tensor([[H, W]]).expand(n, 2)
    return img, sizes


def to_pil(img: torch.Tensor, size) -> Image.Image:
    h, w = int(size[0]), int(size[1])
    a = img[:, :h, :w].permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(np.ascontiguousarray(a), "RGB")


def timeit(fn, min_time=1.0, max_reps=20):
    """Best-of-reps seconds per call (the machine may be shared: the minimum is the robust figure)."""
    fn()  # warm-up
    best, reps, t_start = float("inf"), 0, time.perf_counter()
    while reps < max_reps and (reps < 2 or time.perf_counter() - t_start < min_time):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def train_step_time(mc, img, sizes, sub=32):
    """Seconds of one ResNet-18 SGD step on the crops of the whole batch, timed on ``sub`` images
    and scaled linearly (a full 256-image step takes tens of seconds on a small CPU)."""
    img, sizes, scale = img[:sub], sizes[:sub], img.shape[0] / sub
    try:
        from swav.models import create_backbone
        net = create_backbone("resnet18", in_chans=img.shape[1], small_stem=True)
    except Exception as e:  # models are written elsewhere; the bench must not depend on them
        print(f"  (no ResNet-18 step timing: {type(e).__name__}: {e})")
        return None
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    crops = mc(img, sizes, mc.sample_params(img.shape[0], torch.Generator().manual_seed(0)))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        i = 0
        for k in mc.nmb_crops:  # one forward per resolution, like SwAV
            feats = net(torch.cat(crops[i:i + k]))
            loss = loss + feats.pow(2).mean()
            i += k
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()  # a single step: no warm-up (first-call overhead makes this an over-estimate)
    return (time.perf_counter() - t0) * scale


def bench(name, quick=False):
    cfg = dict(PRESETS[name])
    n, chans, hw, var = cfg.pop("n"), cfg.pop("chans"), cfg.pop("hw"), cfg.pop("var")
    img, sizes = synthetic_batch(n, chans, hw, var)
    mc = MultiCrop(in_chans=chans, **cfg)
    gen = torch.Generator().manual_seed(0)

    def batched():
        return mc(img, sizes, mc.sample_params(n, gen))

    pils = [to_pil(img[i], sizes[i]) for i in range(n)]
    rng = random.Random(0)
    n_pil = n if not quick else max(8, n // 4)

    def per_image():
        return [pil_reference_pipeline(pils[i], rng, **cfg) for i in range(n_pil)]

    t_b = timeit(batched, min_time=0.5 if quick else 2.0)
    t_p = timeit(per_image, min_time=0.0 if quick else 2.0, max_reps=3)
    ips_b, ips_p = n / t_b, n_pil / t_p
    crops = f"{'+'.join(f'{k}x{s}' for k, s in zip(cfg['nmb_crops'], cfg['size_crops']))}"
    print(f"[{name}] {n} imgs {chans}ch {hw[0]}x{hw[1]}{' (var sizes)' if var else ''}, crops {crops}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  batched MultiCrop : {ips_b:9.1f} images/s  ({t_b * 1e3:.1f} ms / batch of {n})")
    print(f"  per-image PIL     : {ips_p:9.1f} images/s")
    print(f"  ratio             : {ips_b / ips_p:9.1f}x")
    if name == "fmnist" and not quick:
        t_s = train_step_time(mc, img, sizes)
        if t_s is not None:
            print(f"  ResNet-18 (small stem) SGD step on these crops ~{t_s * 1e3:.0f} ms "
                  f"(timed on 32 images, x{n // 32}); augmentation = {100 * t_b / (t_b + t_s):.2f}% of step+aug")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", choices=list(PRESETS), nargs="*", default=list(PRESETS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the batched pipeline (default 1: same single core as the PIL one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.preset:
        bench(name, quick=args.quick)


if __name__ == "__main__":
    main()
