"""Image-file datasets: listing, decoding, bad files, conversions, dispatch."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav.data import datasets as dsmod
from swav.data.datasets import (
    EmptyDatasetError,
    FileListDataset,
    ImageFilesDataset,
    ImageFolderDataset,
    Skipped,
    TensorImageDataset,
    build_dataset,
    decode_image,
)
from swav.data.loader import pad_collate


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
def test_class_folders_labels(tmp_path, util):
    util.save_rgb(tmp_path / "dog" / "b.JPG", 8, 6, (0, 200, 0))
    util.save_rgb(tmp_path / "cat" / "a.png", 5, 7, (200, 0, 0))
    util.save_rgb(tmp_path / "cat" / "nested" / "c.PNG", 4, 4, (0, 0, 200))
    util.save_rgb(tmp_path / "dog" / "d.webp", 6, 6, (0, 200, 0))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    util.save_rgb(tmp_path / "dog" / ".hidden.png", 3, 3)
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.has_labels and len(ds) == 4
    names = [os.path.relpath(ds.path(i), tmp_path) for i in range(len(ds))]
    assert names == ["cat/a.png", "cat/nested/c.PNG", "dog/b.JPG", "dog/d.webp"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    img, label, idx = ds[2]
    assert img.dtype == torch.uint8 and img.shape == (3, 6, 8)
    assert (label, idx) == (1, 2)
    assert abs(int(img[1, 3, 3]) - 200) <= 3 and int(img[0, 3, 3]) <= 3


def test_flat_folder_has_no_labels(tmp_path, util):
    for k in (3, 1, 2):
        util.save_rgb(tmp_path / f"img{k}.png", 4 + k, 4)
    ds = ImageFolderDataset(tmp_path, in_chans=1)
    assert not ds.has_labels and ds.classes is None and len(ds) == 3
    assert [Path(ds.path(i)).name for i in range(3)] == ["img1.png", "img2.png", "img3.png"]
    img, label, idx = ds[1]
    assert img.shape == (1, 4, 6) and label == -1 and idx == 1


def test_mixed_and_empty_folders_are_errors(tmp_path, util):
    util.save_rgb(tmp_path / "mixed" / "top.png", 4, 4)
    util.save_rgb(tmp_path / "mixed" / "cls" / "a.png", 4, 4)
    with pytest.raises(ValueError, match="mixes images"):
        ImageFolderDataset(tmp_path / "mixed")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(EmptyDatasetError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")


def test_non_utf8_file_name(tmp_path, util):
    folder = os.fsencode(tmp_path / "flat")
    os.mkdir(folder)
    raw = os.path.join(folder, b"caf\xe9_\xff.png")  # latin-1 bytes: not valid UTF-8
    buf = io.BytesIO()
    Image.new("RGB", (3, 5), (1, 2, 3)).save(buf, format="PNG")
    with open(raw, "wb") as f:
        f.write(buf.getvalue())
    ds = ImageFolderDataset(os.fsdecode(folder))
    assert len(ds) == 1
    assert os.fsencode(ds.path(0)) == raw
    img, _, _ = ds[0]
    assert img.shape == (3, 5, 3) and img[:, 0, 0].tolist() == [1, 2, 3]


def test_listing_many_files(tmp_path):
    """Behaviour only: the listing's speed is measured by bench/bench_listing.py, not asserted here."""
    for c in ("a", "b"):
        d = tmp_path / c
        d.mkdir()
        for i in range(5_000):
            (d / f"{i:05d}.jpg").touch()
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 10_000 and ds.labels[:5_000].eq(0).all() and ds.labels[5_000:].eq(1).all()
    assert Path(ds.path(1)).name == "00001.jpg"
    small = ds.subset(3)
    assert len(small) == 3 and small.labels.tolist() == [0, 0, 0]


def test_file_list_relative_paths_and_labels(tmp_path, util):
    util.save_rgb(tmp_path / "imgs" / "a.png", 4, 4, (255, 0, 0))
    util.save_rgb(tmp_path / "elsewhere" / "b b.png", 6, 5, (0, 255, 0))
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(
        "# my list\n\n"
        "../imgs/a.png\t2\n"
        f"  {tmp_path / 'elsewhere' / 'b b.png'}\t0  \n"
        "   # indented comment\n"
    )
    ds = FileListDataset(lst)
    assert len(ds) == 2 and ds.labels.tolist() == [2, 0] and ds.classes == ["0", "1", "2"]
    assert ds.path(0) == str(tmp_path / "lists" / "../imgs/a.png")
    img, label, _ = ds[1]
    assert label == 0 and img.shape == (3, 5, 6) and img[:, 0, 0].tolist() == [0, 255, 0]

    unl = tmp_path / "lists" / "plain.txt"
    unl.write_text("../imgs/a.png\r\n")
    ds2 = FileListDataset(unl)
    assert not ds2.has_labels and ds2[0][0].shape == (3, 4, 4)


def test_file_list_errors(tmp_path, monkeypatch):
    bad = tmp_path / "nul.txt"
    bad.write_bytes(b"a.png\nb.png\nc\x00.png\n")
    with pytest.raises(ValueError, match=r"nul\.txt.*line 3.*NUL"):
        FileListDataset(bad)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.png\t1\nb.png\n")
    with pytest.raises(ValueError, match=r"mixed\.txt.*line 2"):
        FileListDataset(mixed)
    badlab = tmp_path / "badlab.txt"
    badlab.write_text("a.png\tcat\n")
    with pytest.raises(ValueError, match=r"line 1.*'cat'"):
        FileListDataset(badlab)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(EmptyDatasetError, match="empty.txt"):
        FileListDataset(empty)
    big = tmp_path / "big.txt"
    big.write_text("a.png\n" * 100)
    monkeypatch.setattr(dsmod, "MAX_LIST_FILE_BYTES", 500)
    with pytest.raises(ValueError, match=r"big\.txt.*limit"):
        FileListDataset(big)


# --------------------------------------------------------------------------- #
# Bad files
# --------------------------------------------------------------------------- #
def _bad_files(tmp_path: Path, util) -> dict[str, Path]:
    d = tmp_path / "imgs"
    d.mkdir()
    files = {}
    good_jpg = util.save_noise(d / "good.jpg", 32, 32, fmt="JPEG")
    good_png = util.save_noise(d / "good.png", 16, 16)
    for name, src in (("trunc.jpg", good_jpg), ("trunc.png", good_png)):
        data = src.read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        files[name] = d / name
    (d / "zero.jpg").write_bytes(b"")
    files["zero.jpg"] = d / "zero.jpg"
    (d / "text.jpg").write_text("hello, I am not a JPEG\n")
    files["text.jpg"] = d / "text.jpg"
    files["bomb.png"] = util.png_bomb(d / "bomb.png")
    files["tiny.png"] = util.save_rgb(d / "tiny.png", 3, 40)
    os.symlink(d / "does-not-exist.png", d / "broken.png")
    files["broken.png"] = d / "broken.png"
    return files


@pytest.mark.parametrize(
    "name, reason",
    [
        ("trunc.jpg", "truncated"),
        ("trunc.png", "truncated"),
        ("zero.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
        ("tiny.png", "too small"),
        ("broken.png", "broken symlink"),
    ],
)
def test_bad_file_is_skipped(tmp_path, util, name, reason):
    files = _bad_files(tmp_path, util)
    ds = ImageFilesDataset([files[name]], min_size=8)
    out = ds[0]
    assert isinstance(out, Skipped), out
    assert out.path == str(files[name]) and out.index == 0
    assert reason in out.reason


def test_good_files_come_through_with_bad_ones(tmp_path, util):
    files = _bad_files(tmp_path, util)
    ds = ImageFolderDataset(tmp_path / "imgs", min_size=8)
    assert len(ds) == 9  # the broken symlink is listed too
    batch = pad_collate([ds[i] for i in range(len(ds))], channels=3)
    good = sorted(Path(ds.path(int(i))).name for i in batch.indices)
    assert good == ["good.jpg", "good.png"]
    assert sorted(Path(s.path).name for s in batch.skipped) == sorted(files)
    assert batch.images.shape == (2, 3, 32, 32)


def test_pixel_limit_option(tmp_path, util):
    p = util.save_rgb(tmp_path / "a.png", 40, 30)
    assert isinstance(ImageFilesDataset([p], max_pixels=1000)[0], Skipped)
    assert ImageFilesDataset([p], max_pixels=1200)[0][0].shape == (3, 30, 40)
    s = ImageFilesDataset([p], max_pixels=1000)[0]
    assert "1200 pixels" in s.reason and "1000" in s.reason


def test_pillow_bomb_check_when_our_limit_is_off(tmp_path, util):
    p = util.png_bomb(tmp_path / "bomb.png", 12_000, 12_000)  # 144 M pixels > Pillow's 89 M
    out = ImageFilesDataset([p], max_pixels=0)[0]
    assert isinstance(out, Skipped) and "decompression bomb" in out.reason


def test_unreadable_file_real_permissions(tmp_path, util):
    p = util.save_rgb(tmp_path / "secret.png", 4, 4)
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): permissions do not stop reads")
        out = ImageFilesDataset([p])[0]
        assert isinstance(out, Skipped) and "permission denied" in out.reason
    finally:
        p.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, util, monkeypatch):
    p = util.save_rgb(tmp_path / "secret.png", 4, 4)
    real_open = open

    def fake_open(path, *a, **k):
        if os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(dsmod, "open", fake_open, raising=False)
    out = ImageFilesDataset([p])[0]
    assert isinstance(out, Skipped) and out.reason == "permission denied"


# --------------------------------------------------------------------------- #
# Conversions
# --------------------------------------------------------------------------- #
def test_rgba_composited_on_black(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (200, 100, 50, 255)
    arr[0, 1] = (200, 100, 50, 128)
    arr[1, 0] = (255, 255, 255, 0)
    Image.fromarray(arr, mode="RGBA").save(p)
    img = decode_image(str(p))
    assert img[:, 0, 0].tolist() == [200, 100, 50]
    assert img[:, 0, 1].tolist() == [100, 50, 25]
    assert img[:, 1, 0].tolist() == [0, 0, 0]


def test_palette_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1, 0])
    im.save(p, transparency=1)
    img = decode_image(str(p))
    assert img.shape == (3, 1, 3)
    assert img[:, 0, 0].tolist() == [255, 0, 0] and img[:, 0, 1].tolist() == [0, 0, 0]
    grey = decode_image(str(p), in_chans=1)
    assert grey.shape == (1, 1, 3) and grey[0, 0].tolist() == [76, 0, 76]


def test_cmyk(tmp_path):
    p = tmp_path / "cmyk.tif"
    Image.new("CMYK", (4, 3), (255, 0, 0, 0)).save(p)
    img = decode_image(str(p))
    assert img.shape == (3, 3, 4) and img[:, 1, 1].tolist() == [0, 255, 255]
    q = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(q, quality=95)
    assert (decode_image(str(q)).int() - 255).abs().max() <= 2


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    img = decode_image(str(p), in_chans=1)
    v = img[0, 0].tolist()
    assert v[0] == 0 and abs(v[1] - 128) <= 1 and v[2] == 255 and v[3] == 1
    rgb = decode_image(str(p))
    assert rgb.shape == (3, 1, 4) and rgb[:, 0, 2].tolist() == [255, 255, 255]


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 10))  # white block at the top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(p, exif=exif.tobytes(), quality=95)
    img = decode_image(str(p))
    assert img.shape == (3, 40, 20)
    # top-left goes to the top-right after a clockwise rotation
    assert img[:, 2, 17].min() > 200 and img[:, 2, 2].max() < 50


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (5, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    img = decode_image(str(p))
    assert img.shape == (3, 4, 5) and img[:, 2, 2].tolist() == [255, 0, 0]


def test_grey_to_rgb_and_rgb_to_grey(tmp_path):
    g = tmp_path / "g.png"
    Image.new("L", (3, 2), 77).save(g)
    assert decode_image(str(g)).shape == (3, 2, 3)
    assert decode_image(str(g))[:, 1, 1].tolist() == [77, 77, 77]
    assert decode_image(str(g), in_chans=1)[0, 1, 1] == 77
    c = tmp_path / "c.png"
    Image.new("RGB", (3, 2), (255, 0, 0)).save(c)
    one = decode_image(str(c), in_chans=1)
    assert one.shape == (1, 2, 3) and one[0, 0, 0] == 76  # 0.299 * 255


def test_max_side_downscale_keeps_aspect(tmp_path, util):
    p = util.save_noise(tmp_path / "big.jpg", 300, 120, fmt="JPEG")
    img = decode_image(str(p), max_side=100)
    assert img.shape == (3, 40, 100)
    small = util.save_rgb(tmp_path / "small.png", 50, 20)
    assert decode_image(str(small), max_side=100).shape == (3, 20, 50)
    # min_size applies to the stored size, not to the JPEG draft-reduced one
    wide = util.save_noise(tmp_path / "wide.jpg", 800, 40, fmt="JPEG")
    assert decode_image(str(wide), min_size=30, max_side=100).shape == (3, 5, 100)
    with pytest.raises(dsmod.BadImageError, match="too small"):
        decode_image(str(wide), min_size=41, max_side=100)


def test_tensor_channel_conversion():
    x = torch.tensor([[[[255]], [[0]], [[0]]], [[[0]], [[255]], [[0]]]], dtype=torch.uint8)
    g = dsmod.to_channels(x, 1)
    assert g.flatten().tolist() == [76, 150]  # matches PIL convert("L")
    r = dsmod.to_channels(g, 3)
    assert r.shape == (2, 3, 1, 1) and r[:, 2].flatten().tolist() == [76, 150]


# --------------------------------------------------------------------------- #
# TensorImageDataset and build_dataset
# --------------------------------------------------------------------------- #
def test_tensor_dataset_get_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 5)
    ds = TensorImageDataset(images, torch.arange(10) % 3, ["a", "b", "c"], name="t")
    b = ds.get_batch(torch.tensor([7, 2, 9]))
    assert b.images.shape == (3, 3, 2, 5) and b.images.is_contiguous()
    assert b.images[:, 0, 0, 0].tolist() == [7, 2, 9]
    assert b.labels.tolist() == [1, 2, 0] and b.indices.tolist() == [7, 2, 9]
    assert b.sizes.tolist() == [[2, 5]] * 3 and b.skipped == []
    unl = TensorImageDataset(images, None, None, name="u")
    assert not unl.has_labels and unl.get_batch(torch.tensor([0])).labels.tolist() == [-1]


def test_build_dataset_dispatch(tmp_path, util, isolated_data):
    util.save_rgb(tmp_path / "folder" / "x" / "a.png", 4, 4)
    util.save_rgb(tmp_path / "folder" / "y" / "b.png", 4, 4)
    util.save_rgb(tmp_path / "folder" / "y" / "c.png", 4, 4)
    ds = build_dataset(str(tmp_path / "folder"), subset=2)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 2 and ds.labels.tolist() == [0, 1]
    lst = tmp_path / "list.txt"
    lst.write_text("folder/x/a.png\n")
    assert isinstance(build_dataset(str(lst)), FileListDataset)
    util.write_fashion_mnist(isolated_data / "fashion-mnist", n_train=7)
    fm = build_dataset("Fashion-MNIST", in_chans=3, download=False, subset=5)
    assert isinstance(fm, TensorImageDataset) and len(fm) == 5 and fm.images.shape[1] == 3
    with pytest.raises(ValueError, match=r"fashion-mnist, cifar10, cifar100, stl10"):
        build_dataset(str(tmp_path / "nope"))


def test_build_dataset_split_rules(tmp_path, util):
    util.save_rgb(tmp_path / "s" / "train" / "a" / "1.png", 4, 4)
    util.save_rgb(tmp_path / "s" / "val" / "a" / "2.png", 4, 4)
    util.save_rgb(tmp_path / "s" / "val" / "a" / "3.png", 4, 4)
    assert len(build_dataset(str(tmp_path / "s"))) == 1
    assert len(build_dataset(str(tmp_path / "s"), split="test")) == 2
    util.save_rgb(tmp_path / "flat" / "1.png", 4, 4)
    assert len(build_dataset(str(tmp_path / "flat"))) == 1
    with pytest.raises(ValueError, match="no 'test' split"):
        build_dataset(str(tmp_path / "flat"), split="test")
    (tmp_path / "my_train.txt").write_text("flat/1.png\n")
    with pytest.raises(ValueError, match="no 'test' split"):
        build_dataset(str(tmp_path / "my_train.txt"), split="test")
    (tmp_path / "my_test.txt").write_text("flat/1.png\nflat/1.png\n")
    assert len(build_dataset(str(tmp_path / "my_train.txt"), split="test")) == 2
