"""`--data` given what swav does not read: one image file, an archive, a folder whose files are all
unusable. Each gets a sentence saying what was found and what to give instead (exit 2), not a
file-list parse error or a count of broken files as images."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import swav.data.datasets as datasets
from swav.cli import main
from swav.data.datasets import EmptyDatasetError, build_dataset

SMOKE = ["--preset", "smoke", "--no-report", "--device", "cpu"]


def image_bytes(fmt: str, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def pretrain_error(tmp_path, source, capsys) -> str:
    capsys.readouterr()
    code = main(["pretrain", "--data", str(source), "--out", str(tmp_path / "run"), *SMOKE])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name,fmt,kind", [("IMG_001.jpg", "JPEG", "JPEG"), ("scan.png", "PNG", "PNG"),
                                           ("photo.webp", "WEBP", "WebP"), ("noext", "GIF", "GIF"),
                                           ("cut.jpeg", None, "JPEG")])
def test_an_image_file_says_give_its_folder(tmp_path, name, fmt, kind):
    photos = tmp_path / "photos"
    photos.mkdir()
    path = photos / name
    path.write_bytes(image_bytes(fmt) if fmt else b"\x00\x01 not really a JPEG")  # cut.jpeg: known by its name
    with pytest.raises(ValueError) as ei:
        build_dataset(str(path))
    msg = str(ei.value)
    assert f"{str(path)!r} is one image file ({kind})" in msg and f"here {str(photos)!r}" in msg
    assert "NUL byte" not in msg


def test_an_image_file_through_swav_pretrain(tmp_path, capsys):
    path = tmp_path / "IMG_001.jpg"
    path.write_bytes(image_bytes("JPEG"))
    err = pretrain_error(tmp_path, path, capsys)
    assert "is one image file (JPEG), not a folder of images or a file list: give the folder" in err
    assert "NUL byte" not in err


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("photos/a.jpg", image_bytes("JPEG"))


def _tar(mode):
    def write(path):
        with tarfile.open(path, mode) as t:
            data = image_bytes("PNG")
            info = tarfile.TarInfo("photos/a.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return write


@pytest.mark.parametrize("name,write,kind,command", [
    ("photos.zip", _zip, "a zip archive", "unzip {p} -d {d}/photos"),
    ("photos.tar", _tar("w"), "a tar archive", "mkdir -p {d}/photos && tar -xf {p} -C {d}/photos"),
    ("photos.tar.gz", _tar("w:gz"), "a gzip-compressed tar archive", "tar -xf {p} -C {d}/photos"),
    ("photos.tgz", _tar("w:gz"), "a gzip-compressed tar archive", "tar -xf {p} -C {d}/photos"),
    ("photos.tar.xz", _tar("w:xz"), "an xz-compressed tar archive", "tar -xf {p} -C {d}/photos"),
    ("download.bin", _zip, "a zip archive", "unzip {p} -d {d}/download.bin.d"),  # known by its bytes
])
def test_an_archive_says_unpack_it_and_how(tmp_path, name, write, kind, command):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as ei:
        build_dataset(str(path))
    msg = str(ei.value)
    assert f"{str(path)!r} is {kind}: swav reads images from a folder" in msg, msg
    assert command.format(p=path, d=tmp_path) in msg, msg


def test_a_large_archive_is_named_as_an_archive_not_as_a_too_large_list(tmp_path, capsys):
    path = tmp_path / "stl10_binary.tar.gz"
    with open(path, "wb") as f:  # 200 MB (sparse) that starts like a gzip stream
        f.write(b"\x1f\x8b\x08\x00" + b"\x00" * 60)
        f.truncate(200 * 1024 * 1024)
    err = pretrain_error(tmp_path, path, capsys)
    assert "is a gzip-compressed tar archive" in err and "byte limit" not in err


def _broken_folder(folder, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"b{i:03d}.png").write_bytes(b"not a png" if i % 2 else b"")


def test_a_folder_of_only_unusable_files_says_so(tmp_path, capsys):
    bad = tmp_path / "bad"
    _broken_folder(bad, 2)
    with pytest.raises(EmptyDatasetError) as ei:
        build_dataset(str(bad))
    msg = str(ei.value)
    assert f"folder {str(bad)!r} holds 2 file(s) named like images, but none of the 2 can be used" in msg
    assert "b000.png: empty file" in msg and "b001.png: not an image" in msg
    assert "give a folder of images that open" in msg
    err = pretrain_error(tmp_path, bad, capsys)
    assert "none of the 2 can be used" in err and "fewer than the global batch size" not in err


def test_a_large_folder_is_judged_by_a_spread_sample(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    _broken_folder(bad, 100)
    with pytest.raises(EmptyDatasetError, match=r"none of 32 tried, spread over the 100, can be used"):
        build_dataset(str(bad))
    (bad / "z_good.png").write_bytes(image_bytes("PNG"))  # the last file (sorted): in every spread
    assert len(build_dataset(str(bad))) == 101
    # a usable folder costs one decode
    calls = []
    real = datasets.decode_image
    monkeypatch.setattr(datasets, "decode_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    good = tmp_path / "good"
    good.mkdir()
    for i in range(5):
        (good / f"{i}.png").write_bytes(image_bytes("PNG"))
    assert len(build_dataset(str(good))) == 5 and len(calls) == 1


def test_a_file_list_of_only_unusable_files_says_so(tmp_path):
    bad = tmp_path / "bad"
    _broken_folder(bad, 3)
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(os.listdir(bad))).replace("b", "bad/b"))
    with pytest.raises(EmptyDatasetError, match=r"file list .*train.txt' holds 3 file\(s\) named like images"):
        build_dataset(str(lst))
