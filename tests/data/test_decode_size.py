"""Decoding at the size the crops need (issue 22): the rule loses no pixel a crop would see, the
decoder follows it (JPEG draft + antialiased resize), and a batch's memory no longer depends on the
largest photo in it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from swav.build import decode_options
from swav.config import make_config
from swav.data.datasets import (ImageFolderDataset, crop_decode_side, decode_image, decode_sizes,
                                target_size)
from swav.data.loader import EpochLoader
from swav.data.multicrop import MultiCrop

# the issue's run: --preset imagenet-bs256 with 2x96 + 2x48 crops
ISSUE_CROPS = ["augment.size_crops=[96,48]", "augment.nmb_crops=[2,2]"]


def test_decode_side_of_the_recipes():
    # 224 / sqrt(3/4 * 0.14) = 691.3 for the paper's large crops; 96 / sqrt(3/4 * 0.05) = 495.8
    assert crop_decode_side([224, 96], [0.14, 0.05]) == 692
    assert crop_decode_side([96, 48], [0.14, 0.05]) == 297
    assert crop_decode_side([224, 96], [0.14, 0.05], nmb_crops=[0, 6]) == 496  # an empty group needs nothing
    assert crop_decode_side([224], [0.01]) == 6 * 224  # bounded at 6x the largest crop
    assert decode_sizes("auto", [224, 96], [0.14, 0.05]) == (1384, 692)
    assert decode_sizes(320, [224, 96], [0.14, 0.05]) == (320, 0) and decode_sizes(0, [224], [0.14]) == (0, 0)
    cfg = make_config("imagenet-bs256", overrides=ISSUE_CROPS)
    assert decode_options(cfg) == {"in_chans": 3, "min_size": 0, "max_side": 594, "mean_side": 297}
    with pytest.raises(ValueError, match="max_side"):
        decode_sizes(-1, [224], [0.14])


@pytest.mark.parametrize("shape", [(4000, 3000), (3000, 4000), (6000, 3000), (4000, 1000), (2000, 2000)])
def test_no_crop_box_is_smaller_than_its_output_at_the_decode_size(shape):
    """At the decode size every box multi-crop can draw (smallest scale, extreme aspect ratios, up
    to an aspect ratio of 4:1) keeps at least the crop's side in pixels on both sides, so the crop
    is a downscale of what was decoded, as it is of the full photo; 10 % smaller, boxes of the
    smallest scale fall below it (the rule is tight)."""
    sizes, mins = [224, 96], [0.14, 0.05]
    mc = MultiCrop(sizes, [2, 6], mins, [1.0, 0.14])
    params = mc.sample_params(4000, torch.Generator().manual_seed(0))
    params["rrc"][..., 0] = params["rrc"][..., 0] * 0.02  # area fractions at the bottom of each range
    max_side, mean_side = decode_sizes("auto", sizes, mins)
    side = torch.tensor([s for s, k in zip(sizes, [2, 6]) for _ in range(k)])
    for factor, ok in ((1.0, True), (0.9, False)):
        w, h = target_size(*shape, max_side, int(mean_side * factor))
        cp = mc.concrete_params(torch.tensor([[h, w]]).expand(4000, 2), params)
        assert (cp["trial"] >= 0).all()  # real draws, not the whole-image fallback
        smallest = torch.minimum(cp["boxes"][..., 2], cp["boxes"][..., 3])
        assert bool((smallest >= side).all()) == ok, (shape, factor, int(smallest.min()))


def test_target_size_is_idempotent_and_bounded():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(1, 9000, 2))
        d = int(rng.integers(8, 800))
        tw, th = target_size(w, h, 2 * d, d)
        assert (tw, th) == target_size(tw, th, 2 * d, d)  # a prepared image is not resized again
        assert tw <= w and th <= h and max(tw, th) <= 2 * d
        if min(w, h) > 2 and max(w, h) / min(w, h) <= 4 and w * h > d * d:
            assert abs(math.sqrt(tw * th) / d - 1) < 0.02 + 1.5 / min(tw, th)


def test_decode_follows_the_target_with_draft_and_antialiasing(tmp_path):
    """A JPEG decoded at a quarter of its size comes from the DCT-reduced decode plus an
    antialiased resize: a fine checkerboard becomes grey, not aliased; rotated EXIF images get the
    rotated target."""
    yy, xx = np.mgrid[0:1600, 0:1200]
    board = (((yy // 1) + (xx // 1)) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(tmp_path / "board.png")
    img = decode_image(str(tmp_path / "board.png"), mean_side=300)
    assert img.shape == (3, 346, 260)  # sqrt(260 * 346) = 300
    assert abs(img.float().mean() - 127.5) < 2 and img.float().std() < 3  # grey, not aliased
    Image.new("RGB", (4000, 3000), (200, 100, 50)).save(tmp_path / "big.jpg", quality=90)
    img = decode_image(str(tmp_path / "big.jpg"), mean_side=297, max_side=594)
    assert img.shape == (3, 257, 343) and (img[:, 100, 100].int() - torch.tensor([200, 100, 50])).abs().max() <= 3
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (4000, 3000), (9, 9, 9)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert decode_image(str(tmp_path / "rot.jpg"), mean_side=297, max_side=594).shape == (3, 343, 257)


def test_batch_memory_does_not_depend_on_the_largest_photo(tmp_path):
    """The issue's run: 640x480 photos, one replaced by an 8000x6000 one (48 MP). With the default
    decode (auto) the host batch is exactly as large as without it, bounded by the decode size;
    padding to the largest photo (data.max_side=0, the old default) would be 8 x 3 x 6000 x 8000."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        arr = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg")
    cfg = make_config("imagenet-bs256", overrides=ISSUE_CROPS)
    opts = decode_options(cfg)

    def batch_bytes() -> int:
        ds = ImageFolderDataset(folder, **opts)
        (batch,) = list(EpochLoader(ds, 8, seed=0, epoch=0, shuffle=False))
        assert len(batch) == 8
        return batch.images.nbytes

    without = batch_bytes()
    Image.new("RGB", (8000, 6000), (120, 130, 140)).save(folder / "3.jpg", quality=90)
    with_big = batch_bytes()
    assert with_big == without == 8 * 3 * 257 * 343  # each photo at sqrt(h w) = 297, the decode side
    assert with_big <= 8 * 3 * opts["max_side"] ** 2  # the bound, whatever the photos
    assert with_big * 500 < 8 * 3 * 6000 * 8000
