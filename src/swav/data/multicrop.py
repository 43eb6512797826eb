"""Batched multi-crop augmentation for SwAV (Caron et al. 2020), in plain torch.

Everything runs on the device of the input tensor, vectorised over the batch: there is no
per-sample Python loop (the only loops are over crops, crop groups and the four colour-jitter
positions) and no host/device synchronisation.

Randomness is split in two stages so that multi-process runs can reproduce single-process ones:

* :meth:`MultiCrop.sample_params` draws *raw* uniforms only (a fixed number per sample and crop,
  independent of image sizes), from a generator, typically a CPU generator seeded by
  ``(seed, step)`` for the whole global batch.  ``slice_params(params, a, b)`` gives the draws of
  samples ``a:b``; move them to the device and call ``forward``.
* :meth:`MultiCrop.concrete_params` maps the raw draws and the true image sizes to concrete
  parameters (boxes, flags, factors...), on the params' device.

Per crop, the recipe is the official SwAV one (torchvision semantics):

1. ``RandomResizedCrop(size, scale=(min, max), ratio=(3/4, 4/3))`` with torchvision's 10-trial
   algorithm and centre-crop fallback.  Crop + resize is one separable resampling (two batched
   matmuls with per-sample interpolation matrices, see :func:`_resample_matrix`).
2. horizontal flip (folded into the horizontal resampling matrix, so it is free);
3. with prob. ``jitter_prob``, ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)``, the four ops in a random
   order per sample;
4. ``RandomGrayscale`` (ITU-R 601-2 luma);
5. Gaussian blur with prob. ``blur_prob``, sigma ~ U(blur_sigma), kernel radius ceil(3 sigma),
   reflect padding (separable, again as two batched matmuls with per-sample banded matrices);
6. ``Normalize(mean, std)``;
7. with prob. ``erase_prob`` (0 in the official recipes), random erasing (Zhong et al. 2020,
   torchvision's ``RandomErasing(scale=erase_scale, ratio=(0.3, 3.3), value=0)`` after the
   normalisation): a box of area fraction ~ U(erase_scale) and log aspect ratio ~ U(log 0.3,
   log 3.3), the first of 10 trials that fits strictly inside the crop, set to 0 (the mean); no
   box when none fits. Its uniforms are drawn in a second call only when ``erase_prob > 0``, so
   the draws of every other step stay those of a run without it.

For 1-channel images saturation, hue and grayscale are no-ops (as in torchvision).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from swav.data.transfer import to_device

__all__ = ["MultiCrop", "EvalTransform", "slice_params"]

# torchvision's rgb_to_grayscale coefficients (ITU-R 601-2 luma)
_LUMA = (0.2989, 0.587, 0.114)
_N_TRIALS = 10
# number of raw uniforms per (sample, crop), and their layout along the last dim
_LAYOUT = (
    ("rrc", 2 * _N_TRIALS),  # per trial: area fraction, log aspect ratio
    ("pos", 2),  # y, x position of the accepted box
    ("flip", 1),
    ("jitter", 1),  # jitter applied?
    ("factors", 4),  # brightness, contrast, saturation, hue
    ("order", 4),  # argsort -> random permutation of the 4 jitter ops
    ("gray", 1),
    ("blur", 1),
    ("sigma", 1),
)
_N_DRAWS = sum(k for _, k in _LAYOUT)


def slice_params(params: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Raw params of samples ``start:stop`` (every tensor has the sample as leading dim)."""
    return {k: v[start:stop] for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------
def _resample_matrix(start: torch.Tensor, length: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     out_size: int, in_size: int) -> torch.Tensor:
    """Per-sample 1-D interpolation matrices ``(M, out_size, in_size)`` (float32).

    Output pixel ``i`` samples the source interval ``[start, start + length)`` (continuous
    coordinates, pixel ``p`` covers ``[p, p+1)``) at ``start + (i + 0.5) * length / out_size``.
    Only source pixels in ``[lo, hi)`` contribute; weights are renormalised over them (rows that
    hit no valid pixel are zero).

    Filter: triangle (bilinear) of half-width ``max(scale, 1)`` with ``scale = length/out_size``.
    This is exactly the antialiased bilinear of PIL / ``torch.nn.functional.interpolate(...,
    antialias=True)`` (which torchvision's tensor ``RandomResizedCrop`` uses): for upsampling it is
    plain bilinear with ``align_corners=False`` and edge clamping to the valid range, for
    downsampling the filter widens with the scale factor, so it integrates over the whole
    footprint of each output pixel instead of point-sampling it; that is why fine textures do not
    alias (cf. the checkerboard test).  With ``lo, hi`` = the crop box, this is exactly
    crop-then-resize, so padding (outside the true image) is never read.  We chose explicit
    matrices over ``grid_sample`` + supersampling because they give exact torchvision/PIL
    semantics at any scale factor (no tap-count heuristics) and because, being separable,
    two small batched matmuls are cheap on both CPU and GPU.
    """
    dev = start.device
    scale = (length / out_size).float()
    support = scale.clamp(min=1.0)
    centers = start.float()[:, None] + (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5) * scale[:, None]
    pix = torch.arange(in_size, device=dev, dtype=torch.float32) + 0.5
    d = (pix[None, None, :] - centers[:, :, None]) / support[:, None, None]
    w = (1.0 - d.abs()).clamp_(min=0.0)
    pix_i = torch.arange(in_size, device=dev)
    valid = (pix_i[None, :] >= lo[:, None]) & (pix_i[None, :] < hi[:, None])
    w = w * valid[:, None, :]
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, H, W), C > 1, lies in memory as (N, H, W, C) (the loader's batches do)."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def _resample(src: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """``out[n, c] = wy[n] @ src[n, c] @ wx[n].T``; src (N, C, H, W) float, wy (N, S, H), wx (N, S', W);
    out (N, C, S, S') contiguous. src is never copied: in NCHW memory the width is contracted
    first, in NHWC memory the rows first, on the (H, W * C) matrix of each image."""
    if _channels_last(src):
        n, c, h, w = src.shape
        rows = torch.matmul(wy, src.permute(0, 2, 3, 1).reshape(n, h, w * c))  # (N, S, W * C)
        rows = rows.view(n, -1, w, c).permute(0, 3, 1, 2)  # (N, C, S, W): transposes only this
        return torch.matmul(rows, wx.transpose(1, 2)[:, None])
    # contract the width first: (N, C, H, W) @ (N, 1, W, S') -> (N, C, H, S')
    tmp = torch.matmul(src, wx.transpose(1, 2)[:, None])
    return torch.matmul(wy[:, None], tmp)


# --------------------------------------------------------------------------------------------
# photometric ops on float images in [0, 1], shape (M, C, S, S), per-sample parameters
# --------------------------------------------------------------------------------------------
def _luma(x: torch.Tensor) -> torch.Tensor:
    """(M, 3, S, S) -> (M, 1, S, S) grey (torchvision's rgb_to_grayscale weights)."""
    r, g, b = x.unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend_pass(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One of brightness (op 0), contrast (op 1), saturation (op 2) per sample, torchvision's
    ``_blend``: ``clamp(f * x + (1 - f) * D, 0, 1)`` with D = 0 / mean of grey / grey image.
    ``f == 1`` is an exact identity (D's coefficients are then exactly 0)."""
    m = x.shape[0]
    f = f.to(x.dtype)
    one_m_f = 1.0 - f
    if x.shape[1] == 3:
        gray = _luma(x)
        a = (one_m_f * (op == 2)).view(m, 1, 1, 1)
        b = (one_m_f * (op == 1) * gray.mean(dim=(1, 2, 3))).view(m, 1, 1, 1)
        d = torch.addcmul(b, a, gray)
    else:  # 1 channel: contrast uses the image mean; saturation is a no-op (its f is forced to 1)
        d = (one_m_f * (op == 1) * x.mean(dim=(1, 2, 3))).view(m, 1, 1, 1)
    return torch.addcmul(d, x, f.view(m, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_hue`` (HSV hue rotation by ``shift`` turns), per sample, RGB only."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    cr = maxc - minc
    inv = torch.where(cr > 0, cr.reciprocal(), torch.zeros_like(cr))
    # 6 * hue in [0, 6) (mod 6), as torchvision's _rgb2hsv
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(cr, alpha=2.0), (r - g).add_(cr, alpha=4.0)))
    h6 = torch.remainder(h6.mul_(inv).add_(6.0 * shift.view(-1, 1, 1).to(x.dtype)), 6.0)
    # hsv -> rgb, compact form: c_n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6, v*s = chroma
    out = torch.empty_like(x)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.addcmul(maxc, cr, t, value=-1.0, out=out[:, i])
    return out


def _reflect_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


def _blur_matrix(sigma: torch.Tensor, on: torch.Tensor, size: int, max_radius: int) -> torch.Tensor:
    """Per-sample (M, size, size) matrices of a 1-D Gaussian blur (radius ceil(3 sigma), reflect
    padding); identity where ``on`` is False."""
    m, dev = sigma.shape[0], sigma.device
    offs = torch.arange(-max_radius, max_radius + 1, device=dev)
    sig = sigma.float().clamp(min=1e-6)[:, None]
    radius = torch.ceil(3.0 * sig)
    w = torch.exp(-(offs[None, :].float() ** 2) / (2.0 * sig * sig)) * (offs[None, :].abs() <= radius)
    w = w / w.sum(-1, keepdim=True)
    delta = (offs == 0).float().expand(m, -1)
    w = torch.where(on[:, None], w, delta)
    idx = _reflect_index(torch.arange(size, device=dev)[:, None] + offs[None, :], size)  # (S, K)
    # onehot[k, i, j] = 1 where tap k of output i reads input j; B = sum_k w_k onehot_k (a matmul:
    # deterministic, unlike a scatter_add on CUDA)
    onehot = (idx.t()[:, :, None] == torch.arange(size, device=dev)).to(torch.float32)  # (K, S, S)
    return (w @ onehot.reshape(offs.numel(), size * size)).view(m, size, size)


def _trial_sides(target: torch.Tensor, u: torch.Tensor, ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sides of torchvision's random box trials (RandomResizedCrop, RandomErasing): aspect
    r = exp(U(log ratio_0, log ratio_1)) from ``u``; returns (round(sqrt(target r)),
    round(sqrt(target / r))), float64 like ``target`` (..., T)."""
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(lr0 + (lr1 - lr0) * u)
    return torch.round(torch.sqrt(target * ar)), torch.round(torch.sqrt(target / ar))


def _first_true(ok: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first trial where ``ok`` (..., T) holds (0 where none does) and each of ``values``
    (..., T) at it: (first (...), [value (...), ...])."""
    first = torch.argmax(ok.to(torch.uint8), dim=-1, keepdim=True)
    return first[..., 0], [v.gather(-1, first)[..., 0] for v in values]


def _place(u: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """torchvision's random offset of a box with ``free`` pixels of slack: randint(0, free + 1)
    as floor(u (free + 1)), kept <= free against rounding."""
    return torch.minimum(torch.floor(u * (free + 1)), free)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
def _as_channel_tensor(v, c: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise ValueError(f"{name} has {t.numel()} entries for {c} channels")
    return t.clone()


def _full_sizes(images: torch.Tensor, sizes: torch.Tensor | None, device=None) -> torch.Tensor:
    """The (N, 2) true sizes on ``device`` (default: the images'); None: every image is (H, W)."""
    n, _, h, w = images.shape
    device = images.device if device is None else device
    if sizes is None:
        out = torch.empty((n, 2), dtype=torch.int64, device=device)
        out[:, 0], out[:, 1] = h, w
        return out
    return sizes.to(device=device, dtype=torch.int64)


def _to_float_source(images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """float32 source and the factor mapping it to [0, 1] (uint8 -> 1/255; float assumed [0, 1])."""
    if images.dtype == torch.uint8:
        return images.float(), 1.0 / 255.0
    return images.float(), 1.0


class MultiCrop(nn.Module):
    """SwAV multi-crop augmentation, batched; see the module docstring.

    ``forward(images, sizes, params)`` takes uint8 ``(N, C, H, W)`` images, zero-padded at the
    bottom/right, their true ``(h, w)`` sizes (int64 ``(N, 2)``, or None for all ``(H, W)``) and
    raw params from :meth:`sample_params`, and returns ``sum(nmb_crops)`` float32 tensors
    ``(N, C, size, size)``, crop-major (all crops of group 0 first).
    """

    def __init__(self, size_crops: Sequence[int], nmb_crops: Sequence[int], min_scale_crops: Sequence[float],
                 max_scale_crops: Sequence[float], flip_prob: float = 0.5, jitter_strength: float = 1.0,
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), mean=(0.485, 0.456, 0.406),
                 std=(0.228, 0.224, 0.225), in_chans: int = 3, channels_last: bool = False,
                 erase_prob: float = 0.0, erase_scale: tuple[float, float] = (0.02, 0.33)):
        super().__init__()
        if not (len(size_crops) == len(nmb_crops) == len(min_scale_crops) == len(max_scale_crops)):
            raise ValueError("size_crops, nmb_crops, min_scale_crops, max_scale_crops must have equal lengths")
        if in_chans not in (1, 3):
            raise ValueError("in_chans must be 1 or 3")
        self.size_crops = [int(s) for s in size_crops]
        self.nmb_crops = [int(n) for n in nmb_crops]
        self.min_scale_crops = [float(s) for s in min_scale_crops]
        self.max_scale_crops = [float(s) for s in max_scale_crops]
        for lo, hi in zip(self.min_scale_crops, self.max_scale_crops):
            if not 0.0 < lo <= hi:
                raise ValueError(f"bad crop scale range ({lo}, {hi})")
        self.n_crops = sum(self.nmb_crops)
        self.flip_prob = float(flip_prob)
        self.jitter_strength = float(jitter_strength)
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.in_chans = int(in_chans)
        self.channels_last = bool(channels_last)
        self.erase_prob = float(erase_prob)
        self.erase_scale = (float(erase_scale[0]), float(erase_scale[1]))
        if not 0.0 < self.erase_scale[0] <= self.erase_scale[1] < 1.0:
            raise ValueError(f"bad erase scale range {self.erase_scale}: need 0 < min <= max < 1")
        # sync_free: None = auto (False on CPU, True elsewhere). When False, shapes may depend on
        # the data (host syncs, free on CPU): each crop is resampled from a per-sample window as
        # large as the batch's largest box instead of the whole padded image (the dropped pixels
        # have zero weight), and jitter / blur run only on the samples that draw them. The
        # results agree up to float rounding (tested).
        self.sync_free: bool | None = None
        s = self.jitter_strength
        # brightness, contrast, saturation: factor ~ U[max(0, 1-x), 1+x]; hue shift ~ U[-h, h]
        self.jitter_ranges = [(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        crop_group = [g for g, k in enumerate(self.nmb_crops) for _ in range(k)]
        # constants of the crop geometry and the jitter, made once: on the host (the geometry is
        # planned there when the draws are host tensors) and as buffers that follow the module
        self._host_consts = {
            "_crop_smin": torch.tensor([self.min_scale_crops[g] for g in crop_group], dtype=torch.float64),
            "_crop_smax": torch.tensor([self.max_scale_crops[g] for g in crop_group], dtype=torch.float64),
            "_crop_side": torch.tensor([self.size_crops[g] for g in crop_group], dtype=torch.float64),
            "_jitter_lo_hi": torch.tensor(self.jitter_ranges, dtype=torch.float32),  # (4, 2)
            # 1-channel images: saturation and hue are no-ops (factor 1, shift 0)
            "_grey_keep": torch.tensor([1.0, 1.0, 0.0, 0.0]), "_grey_set": torch.tensor([0.0, 0.0, 1.0, 0.0]),
            "_no_jitter": torch.tensor([1.0, 1.0, 1.0, 0.0]),  # identity brightness/contrast/saturation/hue
        }
        for name, value in self._host_consts.items():
            self.register_buffer(name, value.clone(), persistent=False)
        self.register_buffer("mean", _as_channel_tensor(mean, self.in_chans, "mean"), persistent=False)
        self.register_buffer("std", _as_channel_tensor(std, self.in_chans, "std"), persistent=False)

    def _const(self, name: str, device: torch.device) -> torch.Tensor:
        """A constant on ``device``: the host copy on the CPU (no copy back from the module's
        device), else the module's buffer (moved only if the module lives elsewhere)."""
        if torch.device(device).type == "cpu":
            return self._host_consts[name]
        return getattr(self, name).to(device)

    # ---------------------------------------------------------------- randomness
    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Raw uniforms on the generator's device: ``_N_DRAWS`` per (sample, crop), one call.

        Keys (all ``(n, n_crops, ...)`` float32 in [0, 1)): rrc ``(.., 10, 2)``, pos ``(.., 2)``,
        flip, jitter, factors ``(.., 4)``, order ``(.., 4)``, gray, blur, sigma; with
        ``erase_prob > 0`` also erase, erase_trials ``(.., 10, 2)``, erase_pos ``(.., 2)``, from a
        second call."""
        u = torch.rand(n, self.n_crops, _N_DRAWS, generator=generator, device=generator.device)
        out, i = {}, 0
        for name, k in _LAYOUT:
            v = u[..., i:i + k]
            if name == "rrc":
                v = v.reshape(n, self.n_crops, _N_TRIALS, 2)
            elif k == 1:
                v = v[..., 0]
            out[name] = v
            i += k
        if self.erase_prob > 0:
            e = torch.rand(n, self.n_crops, 3 + 2 * _N_TRIALS, generator=generator, device=generator.device)
            out["erase"] = e[..., 0]
            out["erase_trials"] = e[..., 1:1 + 2 * _N_TRIALS].reshape(n, self.n_crops, _N_TRIALS, 2)
            out["erase_pos"] = e[..., 1 + 2 * _N_TRIALS:]
        return out

    def _erase_boxes(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's RandomErasing.get_params on each (sample, crop) of side S: trial t has
        area S^2 * U(erase_scale) and ratio r = exp(U(log 0.3, log 3.3)), h = round(sqrt(area r)),
        w = round(sqrt(area / r)); the first with h < S and w < S is placed at (floor(u (S - h + 1)),
        floor(u' (S - w + 1))). Returns (on (N, K) bool: drawn and a trial fits, boxes (N, K, 4)
        int64 y0, x0, h, w in crop pixels)."""
        u = params["erase_trials"].double()  # (N, K, T, 2)
        side = self._const("_crop_side", u.device)[None, :, None]  # (1, K, 1)
        target = side * side * (self.erase_scale[0] + (self.erase_scale[1] - self.erase_scale[0]) * u[..., 0])
        h, w = _trial_sides(target, u[..., 1], (0.3, 3.3))
        ok = (h < side) & (w < side)
        _, (h, w) = _first_true(ok, h, w)  # (N, K)
        side = side[..., 0]
        pos = params["erase_pos"].double()
        y0, x0 = _place(pos[..., 0], side - h), _place(pos[..., 1], side - w)
        on = (params["erase"] < self.erase_prob) & ok.any(-1)
        return on, torch.stack([y0, x0, h, w], -1).to(torch.int64)

    def concrete_params(self, sizes: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Concrete per-(sample, crop) parameters, on the params' device. Returns a dict of
        tensors with leading dims ``(N, n_crops)``:

        boxes (y0, x0, h, w) int64 in true-image pixels; trial (accepted RRC trial, -1 =
        fallback centre crop); flip, jitter, gray, blur (bool); factors (brightness, contrast,
        saturation factors and hue shift; identity values for no-op channels ops on 1-channel
        images); order (op id at each of the 4 positions, 0=brightness 1=contrast 2=saturation
        3=hue); sigma (blur sigma).
        """
        dev = params["rrc"].device
        n = params["rrc"].shape[0]
        sizes = sizes.to(device=dev, dtype=torch.int64)
        height = sizes[:, 0, None].double()  # (N, 1)
        width = sizes[:, 1, None].double()
        area = height * width
        # ---- RandomResizedCrop (torchvision.transforms.RandomResizedCrop.get_params)
        u = params["rrc"].double()  # (N, K, T, 2)
        smin, smax = self._const("_crop_smin", dev)[None, :, None], self._const("_crop_smax", dev)[None, :, None]
        target = area[:, :, None] * (smin + (smax - smin) * u[..., 0])
        w, h = _trial_sides(target, u[..., 1], self.ratio)
        ok = (w > 0) & (w <= width[:, :, None]) & (h > 0) & (h <= height[:, :, None])
        any_ok = ok.any(-1)
        first, (w_t, h_t) = _first_true(ok, w, h)  # (N, K): the accepted trial (0 if none)
        # fallback: whole image, centre-cropped to the ratio range
        in_ratio = width / height
        fb_w = torch.where(in_ratio < self.ratio[0], width,
                           torch.where(in_ratio > self.ratio[1], torch.round(height * self.ratio[1]), width))
        fb_h = torch.where(in_ratio < self.ratio[0], torch.round(width / self.ratio[0]), height)
        fb_w, fb_h = fb_w.expand_as(w_t), fb_h.expand_as(h_t)
        bw = torch.where(any_ok, w_t, fb_w)
        bh = torch.where(any_ok, h_t, fb_h)
        pos = params["pos"].double()
        free_y, free_x = height - bh, width - bw
        y0 = torch.where(any_ok, _place(pos[..., 0], free_y), torch.floor(free_y / 2))
        x0 = torch.where(any_ok, _place(pos[..., 1], free_x), torch.floor(free_x / 2))
        boxes = torch.stack([y0, x0, bh, bw], -1).to(torch.int64)
        trial = torch.where(any_ok, first, torch.full_like(first, -1))
        # ---- flags and factors
        jr = self._const("_jitter_lo_hi", dev)  # (4, 2)
        factors = jr[:, 0] + (jr[:, 1] - jr[:, 0]) * params["factors"].float()
        if self.in_chans == 1:  # saturation and hue are no-ops on 1-channel images
            factors = factors * self._const("_grey_keep", dev) + self._const("_grey_set", dev)
        s0, s1 = self.blur_sigma
        erase = {}
        if self.erase_prob > 0:
            erase["erase"], erase["erase_box"] = self._erase_boxes(params)
        return {
            **erase,
            "boxes": boxes,
            "trial": trial,
            "flip": params["flip"] < self.flip_prob,
            "jitter": params["jitter"] < self.jitter_prob,
            "factors": factors,
            "order": torch.argsort(params["order"], dim=-1),
            "gray": (params["gray"] < self.grayscale_prob) & (self.in_chans == 3),
            "blur": params["blur"] < self.blur_prob,
            "sigma": s0 + (s1 - s0) * params["sigma"].float(),
        }

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None,
                params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The crops of ``images`` (on any device). The crop geometry is planned where ``params``
        are: from host draws (the trainer's CPU generator) and host ``sizes`` on the host, so the
        size of each crop's source window is known without reading anything back from the device
        and the parameters reach it as non-blocking copies; from device draws on the device."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images (N, {self.in_chans}, H, W), got {tuple(images.shape)}")
        n, c, hp, wp = images.shape
        if params["rrc"].shape[0] != n:
            raise ValueError(f"params are for {params['rrc'].shape[0]} samples, images for {n}")
        host = params["rrc"].device.type == "cpu" and (sizes is None or sizes.device.type == "cpu")
        sync_free = images.device.type != "cpu" if self.sync_free is None else bool(self.sync_free)
        if host:
            cp = self.concrete_params(_full_sizes(images, sizes, "cpu"), params)
            boxes = cp["boxes"].numpy()  # host memory: reading it never waits for a device
            windows = [(int(boxes[:, k, 2].max()), int(boxes[:, k, 3].max())) for k in range(self.n_crops)]
            cp = to_device(cp, images.device)
        else:
            params = {k: v.to(images.device) for k, v in params.items()}  # no-op when already there
            cp = self.concrete_params(_full_sizes(images, sizes), params)
            windows = None if sync_free else [
                (int(cp["boxes"][:, k, 2].max()), int(cp["boxes"][:, k, 3].max())) for k in range(self.n_crops)]
        outs: list[torch.Tensor] = []
        source: list[torch.Tensor] = []  # the whole image in float32, made once if a crop needs it
        k0 = 0
        for size, k in zip(self.size_crops, self.nmb_crops):
            if k == 0:
                continue
            # crop-major within the group: row j * n + i is crop k0 + j of sample i
            g = {key: v[:, k0:k0 + k].transpose(0, 1).reshape(k * n, *v.shape[2:]) for key, v in cp.items()}
            group = torch.empty(k, n, c, size, size, device=images.device, dtype=torch.float32)
            for j in range(k):
                win = windows[k0 + j] if windows is not None else (hp, wp)
                group[j] = self._crop(images, source, g, slice(j * n, (j + 1) * n), size, win)
            x = group.view(k * n, c, size, size)
            x = self._photometric(x, g, sync_free)
            x = x.sub_(self.mean.to(x.device).view(1, c, 1, 1)).div_(self.std.to(x.device).view(1, c, 1, 1))
            if self.erase_prob > 0:
                x = _erase(x, g["erase"], g["erase_box"])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.extend(x.view(k, n, c, size, size).unbind(0))
            k0 += k
        return outs

    def _crop(self, images: torch.Tensor, source: list, g: dict, rows: slice, size: int,
              window: tuple[int, int]) -> torch.Tensor:
        """One crop of every sample, resized to ``size``: resampled from a per-sample window of
        ``window`` = (h, w) pixels that holds the box (the batch's largest box of this crop: the
        dropped pixels have zero weight), or from the whole padded image when the window is it."""
        n, c, hp, wp = images.shape
        y0, x0, bh, bw = g["boxes"][rows].unbind(-1)
        lh, lw = min(window[0], hp), min(window[1], wp)
        if lh < hp or lw < wp:
            oy = torch.clamp(y0, max=hp - lh)
            ox = torch.clamp(x0, max=wp - lw)
            ry = oy[:, None] + torch.arange(lh, device=oy.device)
            rx = ox[:, None] + torch.arange(lw, device=ox.device)
            if _channels_last(images):  # gathered as (N, H, W, C), while still uint8
                hwc = images.permute(0, 2, 3, 1)
                win = hwc.gather(1, ry.view(n, lh, 1, 1).expand(n, lh, wp, c))
                src = win.gather(2, rx.view(n, 1, lw, 1).expand(n, lh, lw, c)).float().permute(0, 3, 1, 2)
            else:
                win = images.gather(2, ry.view(n, 1, lh, 1).expand(n, c, lh, wp))
                src = win.gather(3, rx.view(n, 1, 1, lw).expand(n, c, lh, lw)).float()
            y0, x0 = y0 - oy, x0 - ox
        else:
            if not source:
                source.append(images.float())
            src = source[0]
        unit = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        y0, x0, bh, bw = y0.float(), x0.float(), bh.float(), bw.float()
        wy = _resample_matrix(y0, bh, y0, y0 + bh, size, lh) * unit  # (N, S, lh), 1/255 folded in
        wx = _resample_matrix(x0, bw, x0, x0 + bw, size, lw)
        wx = torch.where(g["flip"][rows, None, None], wx.flip(1), wx)
        return _resample(src, wy, wx)

    def _photometric(self, x: torch.Tensor, g: dict[str, torch.Tensor], sync_free: bool) -> torch.Tensor:
        c = x.shape[1]
        if self.jitter_prob > 0 and self.jitter_strength > 0:
            x = _apply_where(x, g["jitter"], sync_free,
                             lambda xs, s: self._jitter(xs, g["jitter"][s], g["factors"][s], g["order"][s]))
        if c == 3 and self.grayscale_prob > 0:
            x = torch.where(g["gray"].view(-1, 1, 1, 1), _luma(x).expand(-1, 3, -1, -1), x)
        if self.blur_prob > 0:
            radius = int(math.ceil(3.0 * self.blur_sigma[1]))

            def blur(xs, s):
                bm = _blur_matrix(g["sigma"][s], g["blur"][s], xs.shape[-1], radius)
                return torch.matmul(torch.matmul(bm[:, None], xs), bm.transpose(1, 2)[:, None])

            x = _apply_where(x, g["blur"], sync_free, blur)
        return x

    def _jitter(self, x: torch.Tensor, on: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """ColorJitter with a per-sample op order, sync-free: the 3 blend ops (brightness,
        contrast, saturation) that come before hue, then hue, then those after it. Every sample
        goes through the 6 blend passes, with factor 1 (an exact identity) where a pass is not
        its own; this is the shortest schedule with a single hue pass."""
        m, c = x.shape[0], x.shape[1]
        fac = torch.where(on[:, None], factors, self._const("_no_jitter", x.device))
        ar = torch.arange(4, device=x.device)
        hue_pos = (order == 3).to(torch.int64).argmax(-1)  # position of hue in the sequence
        # the 3 non-hue ops in their order: sort positions, pushing hue's last
        non_hue = torch.gather(order, 1, torch.argsort((order == 3).to(torch.int64) * 4 + ar, dim=1))[:, :3]
        f_non_hue = torch.gather(fac, 1, non_hue)
        one = torch.ones_like(f_non_hue[:, 0])
        for t in range(3):
            x = _blend_pass(x, non_hue[:, t], torch.where(hue_pos > t, f_non_hue[:, t], one))
        if c == 3 and self.jitter_ranges[3][1] > 0:
            x = torch.where(on.view(m, 1, 1, 1), _adjust_hue(x, fac[:, 3]), x)
        for t in range(3):
            x = _blend_pass(x, non_hue[:, t], torch.where(hue_pos <= t, f_non_hue[:, t], one))
        return x


def _erase(x: torch.Tensor, on: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """x (M, C, S, S) with rows y0 <= i < y0 + h, columns x0 <= j < x0 + w set to 0 where ``on``
    (M,); box (M, 4) = y0, x0, h, w."""
    s = torch.arange(x.shape[-1], device=x.device)
    y0, x0, h, w = box.unbind(-1)
    rows = (s >= y0[:, None]) & (s < (y0 + h)[:, None])  # (M, S)
    cols = (s >= x0[:, None]) & (s < (x0 + w)[:, None])
    mask = rows[:, :, None] & cols[:, None, :] & on[:, None, None]  # (M, S, S)
    return x.masked_fill_(mask[:, None], 0.0)


def _apply_where(x: torch.Tensor, mask: torch.Tensor, sync_free: bool, fn) -> torch.Tensor:
    """Apply ``fn(x_rows, selector)`` to the rows of x where ``mask``; ``fn`` must be the identity
    on the rows where mask is False. Sync-free: on all rows. Otherwise only on the selected rows
    (data-dependent shapes, fine on CPU where the host sync is free)."""
    if not sync_free:
        idx = mask.nonzero()[:, 0]
        if idx.numel() == 0:
            return x
        if idx.numel() < mask.numel():
            return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))
    return fn(x, slice(None))


class EvalTransform(nn.Module):
    """Deterministic eval transform, batched: resize the shorter side to ``round(size / 0.875)``
    (antialiased bilinear; skipped when ``resize=False``), centre-crop ``size``, to float in
    [0, 1], normalise. Input: uint8 (N, C, H, W) zero-padded at bottom/right, ``sizes`` (N, 2)
    true (h, w) or None. Regions of the centre crop outside a too-small image are zero (before
    normalisation), like torchvision's padding ``CenterCrop``."""

    def __init__(self, size: int, mean, std, resize: bool = True, channels_last: bool = False):
        super().__init__()
        self.size = int(size)
        self.resize = bool(resize)
        self.channels_last = bool(channels_last)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten().clone(), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten().clone(), persistent=False)

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        n, c, hp, wp = images.shape
        sizes = _full_sizes(images, sizes).double()
        h, w = sizes[:, 0], sizes[:, 1]
        if self.resize:
            short = float(round(self.size / 0.875))
            new_h = torch.where(h <= w, torch.full_like(h, short), torch.floor(short * h / w))
            new_w = torch.where(h <= w, torch.floor(short * w / h), torch.full_like(w, short))
        else:
            new_h, new_w = h, w
        top = torch.round((new_h - self.size) / 2.0)  # torchvision: int(round((H - size) / 2))
        left = torch.round((new_w - self.size) / 2.0)
        sy, sx = h / new_h, w / new_w
        zero = torch.zeros_like(h)
        src, unit = _to_float_source(images)
        wy = _resample_matrix(top * sy, self.size * sy, zero, h, self.size, hp) * unit
        wx = _resample_matrix(left * sx, self.size * sx, zero, w, self.size, wp)
        x = _resample(src, wy, wx)
        mean = _as_channel_tensor(self.mean, c, "mean").to(x.device).view(1, c, 1, 1)
        std = _as_channel_tensor(self.std, c, "std").to(x.device).view(1, c, 1, 1)
        x = x.sub_(mean).div_(std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
