"""Benchmark: batched MultiCrop (swav.data.multicrop) vs the per-image PIL pipeline of the same
transforms (the official SwAV design: one PIL image at a time).

    python bench/bench_augment.py [--quick]

Prints images/s for both and the speed ratio on synthetic uint8 images, for three presets:
``fashion-mnist`` (the transforms of swav's ``fashion-mnist`` preset, read from its config:
1 channel, 28 px, 2x28 + 4x16 crops, jitter 0.5, no blur, batch 256), ``fmnist`` (the same
images with every official transform switched on: blur too) and ``rgb`` (3 channels, padded
variable-size ~160-256 px images, 2x224 + 6x96 crops, the official ImageNet recipe).

``--step`` (default on for ``fashion-mnist``) then runs ``swav bench`` of the fashion-mnist preset
(the library's real training step, with the same thread count) and prints the augmentation's
share of the step.
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

def _from_config(name: str, n: int) -> dict:
    from swav.config import make_config

    cfg = make_config(name)
    a = cfg.augment
    return dict(n=n, chans=cfg.model.in_chans, hw=(28, 28), var=0, size_crops=a.size_crops, nmb_crops=a.nmb_crops,
                min_scale_crops=a.min_scale_crops, max_scale_crops=a.max_scale_crops, mean=tuple(a.mean),
                std=tuple(a.std), flip_prob=a.flip_prob, jitter_strength=a.jitter_strength, jitter_prob=a.jitter_prob,
                grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob, blur_sigma=tuple(a.blur_sigma))


PRESETS = {
    "fashion-mnist": _from_config("fashion-mnist", 256),
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


def bench(name, quick=False, step=False):
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
    if step:
        from swav.benchmark import run_benchmark
        from swav.config import make_config

        r = run_benchmark(make_config("fashion-mnist"), steps=3, warmup=1, threads=torch.get_num_threads())
        aug = r["phases_ms"]["augment"]
        print(f"  swav bench fashion-mnist ({r['precision']}, {r['threads']} threads): step {r['step_ms']:.0f} ms, "
              f"augmentation {aug:.1f} ms = {100 * r['phase_fraction']['augment']:.2f} % of the step")
    return ips_b / ips_p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", choices=list(PRESETS), nargs="*", default=list(PRESETS))
    ap.add_argument("--no-step", action="store_true", help="skip the training-step share (fashion-mnist)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the batched pipeline (default 1: same single core as the PIL one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.preset:
        bench(name, quick=args.quick, step=name == "fashion-mnist" and not args.no_step and not args.quick)


if __name__ == "__main__":
    main()
