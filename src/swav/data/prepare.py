"""``swav prepare``: write a folder of images again at its decode size, once, so that every later
epoch decodes small files.

A 12-MP phone photo costs about as much to decode as 15 photos of 640x480, even with a JPEG
reduced in the DCT domain (its entropy decoding does not shrink). Training decodes every image
once per epoch; a prepared folder pays the full decode once. :func:`prepare_folder` keeps the
folder's layout and file names (class sub-folders included), writes each image with
:func:`~swav.data.datasets.decode_image`'s rules and sizes (the run's decode size: EXIF rotation
applied, transparency on black, 16-bit scaled to 8 bits), and:

* JPEG files stay JPEG (``quality``, 4:2:0); a JPEG already at or below the decode size, stored
  upright in the right colour mode, is copied byte for byte; PNG files stay PNG; any other format
  (WebP, BMP, TIFF, GIF) is written as PNG under its name with ``.png`` added;
* unusable files are listed in ``DIR/skipped.tsv`` (path, reason), not copied;
* it is resumable: each output is written to a temporary name and renamed, so an existing output
  is complete and is kept; ``DIR/prepare.json`` records the settings, and a folder prepared with
  other settings is refused (ValueError) rather than mixed;
* ``workers`` processes decode and encode in parallel.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from swav.atomic import write_atomic, write_text_atomic
from swav.data.datasets import IMAGE_EXTENSIONS, BadImageError, decode_image, scan_images, target_size

__all__ = ["PrepareResult", "prepare_folder", "MANIFEST", "SKIPPED_LIST"]

MANIFEST = "prepare.json"
SKIPPED_LIST = "skipped.tsv"
_FORMAT = 1
_JPEG_NAMES = (".jpg", ".jpeg")


@dataclass
class PrepareResult:
    """What one :func:`prepare_folder` call did."""

    out: Path
    total: int = 0          # image files found in the source
    written: int = 0        # decoded and written (re-encoded) by this call
    copied: int = 0         # already at the decode size: copied byte for byte by this call
    kept: int = 0           # already in the output folder (an earlier, interrupted call)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    bytes_in: int = 0       # source bytes of the files this call wrote or copied
    bytes_out: int = 0      # output bytes of the files this call wrote or copied


def output_name(rel: str) -> str:
    """The output's relative path of a source file's relative path (see the module docstring)."""
    low = rel.lower()
    return rel if low.endswith(_JPEG_NAMES + (".png",)) else rel + ".png"


def _settings(decode: dict, quality: int) -> dict:
    return {"format": _FORMAT, "decode": {k: decode[k] for k in sorted(decode)}, "jpeg_quality": int(quality)}


def _check_folders(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {str(src)!r} does not exist or is not a folder")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise ValueError(f"--out {str(out)!r} is inside the source folder {str(src)!r}: a later scan of the "
                         "source would find the prepared copies; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")


def _open_manifest(out: Path, settings: dict) -> None:
    """Refuse a folder prepared with other settings; record ours in a new one."""
    path = out / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read ({e}); remove it or choose another --out") from None
        if old != settings:
            raise ValueError(f"{out} was prepared with other settings ({json.dumps(old)}), not "
                             f"{json.dumps(settings)}; choose another --out, or delete that folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=1) + "\n")


def _copyable(path: str, decode: dict) -> bool:
    """A JPEG whose stored pixels are what decoding gives: at or below the decode size, upright,
    in the colour mode asked for (its bytes can be copied as they are). Any trouble reading its
    header (a decompression bomb, a broken EXIF block) makes it not copyable: decoding, with the
    training's bad-file policy, then decides whether the file is usable."""
    try:
        return _copyable_header(path, decode)
    except Exception:  # noqa: BLE001 - decode_image reports it as a skipped file
        return False


def _copyable_header(path: str, decode: dict) -> bool:
    with Image.open(path) as im:
        if im.format != "JPEG" or im.mode != ("RGB" if decode.get("in_chans", 3) == 3 else "L"):
            return False
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: decoding rotates it
            return False
        w, h = im.size
        return target_size(w, h, decode.get("max_side", 0), decode.get("mean_side", 0)) == (w, h)


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a call that was killed mid-write (hidden names: a data set never lists them)."""
    for folder, _, names in os.walk(out):
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def _prepare_one(job: tuple[str, str, str, dict, int]) -> tuple[str, str, str, int, int]:
    """Decode and write one file (runs in a worker): ``(rel, outcome, reason, bytes in, bytes out)``
    with outcome ``written``, ``copied`` or ``skipped``."""
    src, dst, rel, decode, quality = job
    try:
        if rel.lower().endswith(_JPEG_NAMES) and _copyable(src, decode):
            decode_image(src, **decode)  # the bad-file policy still decides (a truncated JPEG is skipped)
            write_atomic(dst, lambda f: _copy_into(src, f), durable=False)
            return rel, "copied", "", os.path.getsize(src), os.path.getsize(dst)
        img = decode_image(src, **decode)
    except BadImageError as e:
        return rel, "skipped", str(e), 0, 0
    except OSError as e:  # unreadable between the scan and now
        return rel, "skipped", f"cannot read: {e}", 0, 0
    arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    pim = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if dst.lower().endswith(_JPEG_NAMES):
        save = lambda f: pim.save(f, format="JPEG", quality=quality, subsampling="4:2:0")  # noqa: E731
    else:
        save = lambda f: pim.save(f, format="PNG", compress_level=1)  # noqa: E731
    write_atomic(dst, save, durable=False)
    return rel, "written", "", os.path.getsize(src), os.path.getsize(dst)


def _jobs(src: Path, out: Path, decode: dict, quality: int, result: PrepareResult) -> list[tuple]:
    """The files still to prepare (those whose output exists are counted as kept), their folders made."""
    jobs, folders = [], set()
    for path in scan_images(str(src), IMAGE_EXTENSIONS):
        rel = os.path.relpath(path, src)
        dst = out / output_name(rel)
        result.total += 1
        if dst.exists():
            result.kept += 1
            continue
        if dst.parent not in folders:
            dst.parent.mkdir(parents=True, exist_ok=True)
            folders.add(dst.parent)
        jobs.append((path, str(dst), rel, decode, quality))
    return jobs


def prepare_folder(src: str | os.PathLike, out: str | os.PathLike, *, decode: dict, workers: int = 0,
                   quality: int = 90, on_progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Write every image below ``src`` again below ``out`` at the size ``decode`` (the keyword
    arguments of :func:`~swav.data.datasets.decode_image`, e.g. ``swav.build.decode_options(cfg)``)
    gives, in ``workers`` processes (0: in this one). ``on_progress(done, total)`` after each file
    of this call. See the module docstring."""
    src, out = Path(src), Path(out)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality {quality} must be in 1..100")
    _check_folders(src, out)
    _open_manifest(out, _settings(decode, quality))
    _remove_stale_temporaries(out)
    result = PrepareResult(out)
    jobs = _jobs(src, out, decode, int(quality), result)
    for done, (rel, outcome, reason, n_in, n_out) in enumerate(_run_jobs(jobs, workers), start=1):
        if outcome == "skipped":
            result.skipped.append((rel, reason))
        else:
            setattr(result, outcome, getattr(result, outcome) + 1)
            result.bytes_in += n_in
            result.bytes_out += n_out
        if on_progress is not None:
            on_progress(done, len(jobs))
    result.skipped.sort()
    lines = "".join(f"{rel}\t{reason}\n" for rel, reason in result.skipped)
    write_text_atomic(out / SKIPPED_LIST, "path\treason\n" + lines)
    return result


def _run_jobs(jobs: list[tuple], workers: int):
    if workers <= 0 or len(jobs) <= 1:
        yield from map(_prepare_one, jobs)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_prepare_one, jobs, chunksize=4)
