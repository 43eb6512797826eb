"""``swav prepare`` (issue 22): the folder written again at the decode size, same sub-folders and
names, bad files listed, resumable, parallel; training on it decodes the files as they are."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import swav.cli
from swav.data.datasets import ImageFolderDataset, decode_image
from swav.data.prepare import MANIFEST, SKIPPED_LIST, prepare_folder

DECODE = {"in_chans": 3, "min_size": 0, "max_side": 200, "mean_side": 100}


def _photo(path, w, h, seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC).save(path, **save)
    return path


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    _photo(src / "cats" / "big.jpg", 800, 600, 1)
    _photo(src / "cats" / "small.JPG", 96, 72, 2, quality=95)  # below the decode size: copied as it is
    _photo(src / "dogs" / "sub" / "wide.png", 900, 300, 3)
    _photo(src / "dogs" / "photo.webp", 400, 400, 4)
    (src / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return src


def test_prepare_keeps_the_layout_and_decodes_small(source, tmp_path):
    out = tmp_path / "out"
    res = prepare_folder(source, out, decode=DECODE, workers=2)
    assert (res.total, res.written, res.copied, res.kept) == (5, 3, 1, 0)
    assert [rel for rel, _ in res.skipped] == [os.path.join("dogs", "broken.jpg")] and res.skipped[0][1]
    listed = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert listed == sorted([MANIFEST, SKIPPED_LIST, "cats/big.jpg", "cats/small.JPG", "dogs/sub/wide.png",
                             "dogs/photo.webp.png"])
    assert (out / "cats" / "small.JPG").read_bytes() == (source / "cats" / "small.JPG").read_bytes()
    with Image.open(out / "cats" / "big.jpg") as im:
        assert im.format == "JPEG" and im.size == (115, 87)  # sqrt(115 * 87) = 100
    with Image.open(out / "dogs" / "sub" / "wide.png") as im:
        assert im.format == "PNG" and im.size == (173, 58)
    assert "broken.jpg" in (out / SKIPPED_LIST).read_text()
    # training on the prepared folder: the same classes, and nothing is resized again
    ds = ImageFolderDataset(out, **DECODE)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4
    again = decode_image(str(out / "cats" / "big.jpg"), **DECODE)
    assert again.shape == (3, 87, 115)
    direct = decode_image(str(source / "cats" / "big.jpg"), **DECODE)
    assert (again.float() - direct.float()).abs().mean() < 3  # JPEG quality 90 of the same pixels


def test_prepare_is_resumable_and_refuses_other_settings(source, tmp_path):
    out = tmp_path / "out"
    prepare_folder(source, out, decode=DECODE, workers=0)
    (out / "cats" / "big.jpg").unlink()  # as if interrupted before this file
    (out / "cats" / ".big.jpg.tmp-123").write_bytes(b"half written")
    kept = out / "dogs" / "sub" / "wide.png"
    mtime = kept.stat().st_mtime_ns
    res = prepare_folder(source, out, decode=DECODE, workers=0)
    assert (res.written, res.copied, res.kept, len(res.skipped)) == (1, 0, 3, 1)
    assert kept.stat().st_mtime_ns == mtime and not (out / "cats" / ".big.jpg.tmp-123").exists()
    assert json.loads((out / MANIFEST).read_text())["decode"] == DECODE
    with pytest.raises(ValueError, match="other settings"):
        prepare_folder(source, out, decode={**DECODE, "mean_side": 50})
    with pytest.raises(ValueError, match="inside the source"):
        prepare_folder(source, source / "prepared", decode=DECODE)


def test_prepare_command(source, tmp_path, capsys):
    out = tmp_path / "cmd"
    code = swav.cli.main(["prepare", str(source), "--out", str(out), "--workers", "0",
                          "--set", "augment.size_crops=[64,32]", "--set", "augment.nmb_crops=[2,2]"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 image(s)" in captured.out and "1 unusable" in captured.out
    # 64 / sqrt(3/4 * 0.14) = 197.5 -> geometric-mean side 198: the 800x600 photo becomes 229x171
    assert Image.open(out / "cats" / "big.jpg").size == (229, 171)
    assert swav.cli.main(["prepare", str(source), "--out", str(tmp_path / "bad"), "--set", "data.max_side=-3"]) == 2
    assert "data.max_side" in capsys.readouterr().err
    img = decode_image(str(out / "cats" / "big.jpg"))
    assert img.dtype == torch.uint8


def test_a_file_whose_header_is_a_decompression_bomb_is_listed_not_fatal(tmp_path):
    """A small JPEG whose header claims 60000x60000 pixels: decoding refuses it as a bomb (as
    training does) and prepare lists it among the skipped files and writes the others."""
    src = tmp_path / "src"
    good = _photo(src / "a" / "good.jpg", 300, 200, 3)
    bomb = _photo(src / "a" / "bomb.jpg", 16, 16, 4)
    data = bytearray(bomb.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    bomb.write_bytes(bytes(data))
    with pytest.raises(Exception):
        decode_image(str(bomb), **DECODE)
    res = prepare_folder(src, tmp_path / "out", decode=DECODE, workers=1)
    assert [rel for rel, _ in res.skipped] == [os.path.join("a", "bomb.jpg")]
    assert "bomb" in res.skipped[0][1]
    assert (tmp_path / "out" / "a" / good.name).exists()
