"""Image datasets: in-memory tensors, image files on disk, folders and file lists.

Two kinds of dataset exist:

* :class:`TensorImageDataset` (defined in :mod:`swav.data.memory`, re-exported
  here) holds a whole data set as one uint8 tensor ``(N, C, H, W)`` (the
  built-in data sets of :mod:`swav.data.builtin`).  A batch is one
  ``index_select`` (:meth:`TensorImageDataset.get_batch`).
* :class:`ImageFilesDataset` decodes one image file per ``__getitem__`` with
  Pillow.  A file that cannot be used never raises: it comes back as a
  :class:`Skipped` record (path and reason), so one bad file never kills a
  data-loader worker.  :class:`ImageFolderDataset` and
  :class:`FileListDataset` are the two ways to list the files.

Every data set says which kind it is with ``in_memory`` (True: in memory, all
images of one size, batches gathered by ``get_batch``).  :func:`build_dataset`
turns a source (built-in name, folder or file list) into a data set.
:class:`Skipped` is defined in :mod:`swav.data.batch` and re-exported here.

Decoding rules (:func:`decode_image`):

* the image is decoded completely (``Image.load``) with Pillow's
  ``LOAD_TRUNCATED_IMAGES`` left off, so a truncated file is an error;
* decompression bombs: an image whose header declares more than
  ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS` = 2**26, about
  8192 x 8192) is skipped before any pixel is decoded; with ``max_pixels=0``
  Pillow's own limit applies and its ``DecompressionBombWarning`` is treated as
  an error.  Pillow's ``DecompressionBombError`` (twice its global limit) always
  skips the file;
* the EXIF orientation is applied (``ImageOps.exif_transpose``); an animated
  image gives its first frame;
* transparency (RGBA, LA, palette or grey/RGB with a transparent colour) is
  composited on **black** (colour times alpha), matching the zero padding of
  batches;
* 16-bit images (``I;16*``) are rescaled to 8 bits with ``round(v / 257)``
  (65535 -> 255, 32768 -> 128); 32-bit integer images (``I``) are clipped to
  [0, 65535] and rescaled the same way; float images (``F``) are taken as
  [0, 1] when their maximum is <= 1, else clipped to [0, 255];
* CMYK, YCbCr, LAB, HSV, 1-bit and palette images go through Pillow's
  ``convert``; the result is RGB for ``in_chans=3`` and L (ITU-R 601-2 luma)
  for ``in_chans=1``;
* ``min_size``: an image with a side shorter than this (after EXIF rotation)
  is skipped;
* the decode size (:func:`target_size`): ``mean_side`` D shrinks an image whose
  geometric-mean side ``sqrt(h w)`` exceeds D to that side (area D^2), and
  ``max_side`` an image whose longer side exceeds it to that side; aspect ratio
  kept, antialiased (Pillow's bilinear filter, the interpolation of
  torchvision's RandomResizedCrop), JPEGs first decoded at the largest DCT
  reduction (1/2, 1/4, 1/8) that still holds the target (``Image.draft``: the
  pixels a full decode would throw away are never computed).
  :func:`crop_decode_side` gives the D that multi-crop needs and
  :func:`decode_sizes` turns a ``data.max_side`` setting into both numbers.

Images come back as ``(C, H, W)`` views of the decoder's ``(H, W, C)`` memory,
and batches keep that layout (channels-last): pixels are never transposed on
the host.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from swav.data import builtin
from swav.data.batch import Skipped
from swav.data.memory import TensorImageDataset, to_channels
from swav.data.sources import refuse_non_list_file

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_LIST_FILE_BYTES",
    "BadImageError",
    "EmptyDatasetError",
    "FileListDataset",
    "ImageFilesDataset",
    "ImageFolderDataset",
    "Skipped",
    "TensorImageDataset",
    "build_dataset",
    "crop_decode_side",
    "decode_image",
    "decode_sizes",
    "target_size",
    "to_channels",
]

#: Images declaring more pixels than this are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 2**26
#: File extensions (lower case) that folder listing picks up.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: File lists larger than this are refused.
MAX_LIST_FILE_BYTES = 100 * 1024 * 1024


class EmptyDatasetError(ValueError):
    """A source holds no usable image."""


class BadImageError(Exception):
    """An image file that cannot be used; the message is the reason."""


# --------------------------------------------------------------------------- #
# Decoding one image file
# --------------------------------------------------------------------------- #
def _describe_missing(path: str) -> str:
    if os.path.islink(path):
        return f"broken symlink (target {os.readlink(path)!r} does not exist)"
    return "file not found"


def _scale16(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _to_8bit(im: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer and float images to mode L."""
    mode = im.mode
    if mode.startswith("I;16"):
        return Image.fromarray(_scale16(np.array(im)), mode="L")
    if mode == "I":
        arr = np.clip(np.array(im, dtype=np.int64), 0, 65535)
        return Image.fromarray(_scale16(arr), mode="L")
    if mode == "F":
        arr = np.array(im, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return im


def _composite_black(im: Image.Image) -> np.ndarray:
    """RGBA -> RGB uint8 array, colour multiplied by alpha (black background)."""
    arr = np.array(im.convert("RGBA"), dtype=np.uint16)
    rgb, a = arr[..., :3], arr[..., 3:4]
    return ((rgb * a + 127) // 255).astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def _convert(im: Image.Image, in_chans: int) -> np.ndarray:
    im = _to_8bit(im)
    if _has_alpha(im):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency ..." notice
            rgb = _composite_black(im)
        if in_chans == 3:
            return rgb
        im = Image.fromarray(rgb, mode="RGB")
    if in_chans == 3:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.array(im, dtype=np.uint8)
    if im.mode != "L":
        if im.mode not in ("RGB", "1", "P"):
            im = im.convert("RGB")
        im = im.convert("L")
    return np.array(im, dtype=np.uint8)[..., None]


#: An image whose area is within this factor of the decode area keeps its size (a prepared folder
#: is not resized again for the rounding of its sides).
_AREA_SLACK = 1.02
#: The aspect ratio range of multi-crop's boxes (torchvision's RandomResizedCrop): a box of ratio r
#: has its shorter side sqrt(area * min(r, 1/r)) >= sqrt(area * 3/4).
_MIN_BOX_RATIO = 3.0 / 4.0


def crop_decode_side(size_crops: Sequence[int], min_scale_crops: Sequence[float],
                     nmb_crops: Sequence[int] | None = None) -> int:
    """The geometric-mean side D at which multi-crop loses nothing: ``ceil(max_g S_g / sqrt(3/4 *
    smin_g))`` over the crop groups g (side S_g, smallest area fraction smin_g), at most 6 x the
    largest crop side.

    Why: crop group g draws a box of area ``s * h * w`` (s >= smin_g) and aspect r in [3/4, 4/3] and
    resamples it to S_g x S_g. Its shorter side is at least ``sqrt(smin_g * h * w * 3/4)``; in an
    image of area D^2 that is >= S_g, so every box still holds at least S_g pixels on each side and
    every crop is a downscale of the decoded image. A crop of S_g pixels over a box can show detail
    only up to S_g / 2 cycles across it; the decoded image keeps up to D-scale Nyquist, which for
    every box is at least that: the crop sees what it would see in the full-size photo (up to the
    resampling filters). A photo smaller than D^2 is not shrunk at all. The bound 6 x the largest
    crop side (reached only below a min scale of 0.037 for the largest crops) keeps a run's memory
    and decode time in proportion to its crops."""
    groups = [(int(sz), float(sm)) for k, (sz, sm) in enumerate(zip(size_crops, min_scale_crops))
              if nmb_crops is None or int(nmb_crops[k]) > 0]
    if not groups:
        raise ValueError("crop_decode_side: no crop group")
    need = max(sz / math.sqrt(_MIN_BOX_RATIO * sm) for sz, sm in groups)
    return int(min(math.ceil(need - 1e-9), 6 * max(sz for sz, _ in groups)))


def decode_sizes(max_side: int | str, size_crops: Sequence[int], min_scale_crops: Sequence[float],
                 nmb_crops: Sequence[int] | None = None) -> tuple[int, int]:
    """``(max_side, mean_side)`` of :func:`decode_image` for a ``data.max_side`` setting: ``"auto"``
    -> ``(2 D, D)`` with D = :func:`crop_decode_side` (the longer side bounded at 2 D: lossless up
    to an aspect ratio of 4:1, and a batch's padded canvas is at most 2D x 2D whatever the photos);
    an integer N -> ``(N, 0)`` (longer side at most N; 0 = full size)."""
    if max_side == "auto":
        d = crop_decode_side(size_crops, min_scale_crops, nmb_crops)
        return 2 * d, d
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 0:
        raise ValueError(f"max_side must be 'auto' or an integer >= 0, got {max_side!r}")
    return int(max_side), 0


def target_size(w: int, h: int, max_side: int = 0, mean_side: int = 0) -> tuple[int, int]:
    """The decoded ``(w, h)`` of a ``w x h`` image: scaled by ``min(1, mean_side / sqrt(w h),
    max_side / max(w, h))`` (a rule that is 0 is off; an area within 2 % of ``mean_side^2`` is left
    alone), sides rounded (down where rounding would leave the area over that), at least 1. Never
    larger than the image, and a second call on its result gives it back (a prepared folder is not
    resized again)."""
    s = 1.0
    if mean_side > 0 and w * h > _AREA_SLACK * mean_side * mean_side:
        s = mean_side / math.sqrt(w * h)
    if max_side > 0 and max(w, h) > max_side:
        s = min(s, max_side / max(w, h))
    if s >= 1.0:
        return w, h
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    if mean_side > 0 and tw * th > _AREA_SLACK * mean_side * mean_side:  # rounded up too far: a
        tw, th = max(1, math.floor(w * s)), max(1, math.floor(h * s))  # resize would follow next time
    return tw, th


def _open_checked(path: str):
    """The file of ``path`` opened for reading, after the checks that need no decoding."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImageError(_describe_missing(path)) from None
    except OSError as e:
        raise BadImageError(f"cannot stat: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError("not a regular file")
    if st.st_size == 0:
        raise BadImageError("empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone switched it on globally
        raise BadImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; refusing to decode (truncation undetectable)")
    try:
        return open(path, "rb")
    except PermissionError:
        raise BadImageError("permission denied") from None
    except OSError as e:
        raise BadImageError(f"cannot open: {e.strerror or e}") from None


def _upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; in place (the copy an upright image would
    get costs as much as a small image's decode)."""
    try:
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except TypeError:  # Pillow < 9.4: no in_place
            im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    return im


def _decode_pixels(f, in_chans: int, min_size: int, max_side: int, mean_side: int,
                   max_pixels: int) -> np.ndarray:
    """Decode an open file to a uint8 ``(H, W, C)`` array at its decode size (BadImageError)."""
    with warnings.catch_warnings():
        # Pillow's notes on damaged metadata ("Corrupt EXIF data", "Truncated File Read" in a
        # tag, ...) would repeat for such a file at every epoch; the pixels decide, not them
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        if max_pixels > 0:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(f)
        except Image.UnidentifiedImageError:
            raise BadImageError("not an image (Pillow cannot identify the format)") from None
        w, h = im.size
        if max_pixels > 0 and w * h > max_pixels:
            raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        if min_size > 0 and min(w, h) < min_size:  # min(w, h) does not change with rotation
            raise BadImageError(f"too small: {w}x{h} < min_size {min_size}")
        size = target_size(w, h, max_side, mean_side)
        if im.format == "JPEG" and size != (w, h):
            im.draft(im.mode, size)  # DCT-domain reduction by 1/2, 1/4 or 1/8, never below `size`
        im.load()  # full decode: a truncated file raises here
        im = _upright(im)
        size = target_size(*im.size, max_side, mean_side)
        if size != im.size and im.mode == ("RGB" if in_chans == 3 else "L") and not _has_alpha(im):
            im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)  # resize what is decoded
        arr = _convert(im, in_chans)
    if (arr.shape[1], arr.shape[0]) != size:
        pim = Image.fromarray(arr[..., 0] if in_chans == 1 else arr)
        arr = np.array(pim.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.uint8)
        if in_chans == 1:
            arr = arr[..., None]
    return arr


def decode_image(
    path: str,
    *,
    in_chans: int = 3,
    min_size: int = 0,
    max_side: int = 0,
    mean_side: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Decode one image file to a uint8 tensor ``(in_chans, H, W)`` (a view of ``(H, W, C)``
    memory) at its decode size (:func:`target_size`).

    Raises :class:`BadImageError` (message = reason) for any unusable file.
    See the module docstring for the conversion rules.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    f = _open_checked(path)
    try:
        with f:
            arr = _decode_pixels(f, in_chans, min_size, max_side, mean_side, max_pixels)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb: {e}") from None
    except MemoryError:
        raise BadImageError("out of memory while decoding") from None
    except Exception as e:  # truncated, corrupt, unsupported mode, ...
        raise BadImageError(f"cannot decode: {type(e).__name__}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


# --------------------------------------------------------------------------- #
# Datasets of image files
# --------------------------------------------------------------------------- #
class _PathTable:
    """Paths packed in one byte buffer (no per-path Python object to share).

    Forked data-loader workers then do not touch reference counts of 100,000s
    of strings (which would copy the pages of the parent's memory).
    """

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        lens = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lens, out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.blob[a:b].tobytes())

    def head(self, n: int) -> "_PathTable":
        t = _PathTable.__new__(_PathTable)
        t.offsets = self.offsets[: n + 1].copy()
        t.blob = self.blob[: t.offsets[-1]].copy()
        return t


class ImageFilesDataset:
    """Images decoded from files, one per ``__getitem__``.

    ``__getitem__(i)`` returns ``(uint8 tensor (C, H, W), label, i)`` with
    ``label = -1`` when the data set has no labels, or a :class:`Skipped`
    record for a file that cannot be used (it never raises for a bad file).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | torch.Tensor | None = None,
        classes: list[str] | None = None,
        *,
        in_chans: int = 3,
        min_size: int = 0,
        max_side: int = 0,
        mean_side: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str = "files",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self._paths = paths if isinstance(paths, _PathTable) else _PathTable(paths)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.shape != (len(self._paths),):
                raise ValueError(f"{name}: {labels.numel()} labels for {len(self._paths)} paths")
        self.labels = labels
        self.classes = list(classes) if classes is not None else None
        self.in_chans = in_chans
        self.min_size = int(min_size)
        self.max_side = int(max_side)
        self.mean_side = int(mean_side)
        self.max_pixels = int(max_pixels)
        self.name = name

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def in_memory(self) -> bool:
        """False: images are decoded from files, one per ``__getitem__``, and may differ in size."""
        return False

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def path(self, i: int) -> str:
        return self._paths[i]

    @property
    def decode_options(self) -> dict:
        """The keyword arguments of :func:`decode_image` this data set decodes with."""
        return {"in_chans": self.in_chans, "min_size": self.min_size, "max_side": self.max_side,
                "mean_side": self.mean_side, "max_pixels": self.max_pixels}

    @property
    def paths(self) -> list[str]:
        return [self._paths[i] for i in range(len(self))]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        path = self._paths[i]
        try:
            img = decode_image(path, **self.decode_options)
        except BadImageError as e:
            return Skipped(path, str(e), i)
        label = int(self.labels[i]) if self.labels is not None else -1
        return img, label, i

    def subset(self, n: int) -> "ImageFilesDataset":
        """The first ``n`` files (all of them when ``n <= 0`` or ``n >= len``)."""
        if n <= 0 or n >= len(self):
            return self
        new = ImageFilesDataset.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._paths = self._paths.head(n)
        new.labels = self.labels[:n].clone() if self.labels is not None else None
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, labels={self.has_labels})"


def _is_image_name(name: str, extensions: tuple[str, ...]) -> bool:
    if name.startswith("."):
        return False
    return os.path.splitext(name)[1].lower() in extensions


def scan_images(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """All image files below ``folder`` (recursive, follows directory links once)."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if not e.name.startswith("."):
                        stack.append(e.path)
                elif _is_image_name(e.name, extensions):
                    out.append(e.path)  # includes broken symlinks: they become Skipped
    out.sort()
    return out


class ImageFolderDataset(ImageFilesDataset):
    """Images in a folder.

    * class layout: ``root/<class>/**/<image>``; classes are the sorted names
      of sub-folders that hold at least one image, labels index them;
    * flat layout: images directly in ``root`` (no labels);
    * both at once is an error.

    Extensions: :data:`IMAGE_EXTENSIONS` (case-insensitive); names starting
    with ``.`` are ignored.  Paths are sorted for determinism and kept as str
    (non-UTF-8 bytes round-trip through ``os.fsdecode``'s surrogateescape).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **decode,
    ) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        exts = tuple(x.lower() if x.startswith(".") else "." + x.lower() for x in extensions)
        flat: list[str] = []
        subdirs: list[tuple[str, str]] = []
        with os.scandir(root) as it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if not e.name.startswith("."):
                        subdirs.append((e.name, e.path))
                elif _is_image_name(e.name, exts):
                    flat.append(e.path)
        subdirs.sort()
        classes: list[str] = []
        class_files: list[list[str]] = []
        for cname, cpath in subdirs:
            files = scan_images(cpath, exts)
            if files:
                classes.append(cname)
                class_files.append(files)
        if flat and classes:
            raise ValueError(
                f"image folder {root!r} mixes images directly in it ({len(flat)}, e.g. "
                f"{os.path.basename(flat[0])!r}) with class sub-folders ({len(classes)}, e.g. {classes[0]!r}); "
                "use either root/<class>/<image> or only root/<image>"
            )
        if classes:
            paths = [p for files in class_files for p in files]
            labels = [k for k, files in enumerate(class_files) for _ in files]
            super().__init__(paths, labels, classes, name=root, **decode)
        elif flat:
            flat.sort()
            super().__init__(flat, None, None, name=root, **decode)
        else:
            raise EmptyDatasetError(
                f"no image files ({', '.join(exts)}) in folder {root!r} or its class sub-folders"
            )
        self.root = root


class FileListDataset(ImageFilesDataset):
    """Images listed in a text file.

    Format, one image per line (UTF-8; other bytes kept via surrogateescape)::

        # comment
        images/cat1.jpg
        /abs/path/dog.png<TAB>3

    * a path may be followed by a TAB and an integer label >= 0; either every
      line has a label or none does;
    * relative paths are relative to the folder of the list file;
    * blank lines and lines whose first non-blank character is ``#`` are
      ignored; surrounding whitespace is stripped;
    * files over 100 MB or containing NUL bytes are refused.
    """

    def __init__(self, list_file: str | os.PathLike, **decode) -> None:
        list_file = os.fspath(list_file)
        refuse_non_list_file(list_file, IMAGE_EXTENSIONS)  # one image, or an archive: say what to give
        size = os.path.getsize(list_file)
        if size > MAX_LIST_FILE_BYTES:
            raise ValueError(
                f"file list {list_file!r} is {size} bytes, over the {MAX_LIST_FILE_BYTES} byte limit "
                "(is it really a list of image paths?)"
            )
        with open(list_file, "rb") as f:
            data = f.read()
        base = os.path.dirname(os.path.abspath(list_file))
        paths: list[str] = []
        labels: list[int] = []
        n_unlabelled = 0
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if b"\x00" in raw:
                raise ValueError(f"file list {list_file!r} line {lineno}: NUL byte (binary file?)")
            line = raw.decode("utf-8", "surrogateescape").strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                p, _, lab = line.rpartition("\t")
                p = p.strip()
                try:
                    label = int(lab.strip())
                except ValueError:
                    raise ValueError(
                        f"file list {list_file!r} line {lineno}: label {lab.strip()!r} is not an integer"
                    ) from None
                if label < 0:
                    raise ValueError(f"file list {list_file!r} line {lineno}: negative label {label}")
                labels.append(label)
            else:
                p = line
                n_unlabelled += 1
            if labels and n_unlabelled:
                raise ValueError(
                    f"file list {list_file!r} line {lineno}: some lines have a <TAB>label and some do not"
                )
            paths.append(p if os.path.isabs(p) else os.path.join(base, p))
        if not paths:
            raise EmptyDatasetError(f"file list {list_file!r} lists no image")
        classes = [str(k) for k in range(max(labels) + 1)] if labels else None
        super().__init__(paths, labels or None, classes, name=list_file, **decode)
        self.list_file = list_file


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #
def _folder_for_split(root: str, split: str) -> str:
    """Folder split rule: ``root/train`` + ``root/test`` (or ``root/val``) are
    splits when both exist; otherwise ``root`` itself is the train split and
    there is no test split."""
    has_train = os.path.isdir(os.path.join(root, "train"))
    test_dir = next(
        (os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None
    )
    if has_train and test_dir is not None:
        return os.path.join(root, "train") if split == "train" else test_dir
    if split == "train":
        return root
    raise ValueError(
        f"folder {root!r} has no {split!r} split: a folder is split only when it holds both "
        "'train/' and 'test/' (or 'val/') sub-folders"
    )


def _list_for_split(list_file: str, split: str) -> str:
    """List split rule: for ``split='test'`` a list whose file name contains
    ``train`` uses the sibling with ``train`` replaced by ``test`` (then
    ``val``), e.g. ``train.txt`` -> ``test.txt``."""
    if split == "train":
        return list_file
    folder, fname = os.path.split(list_file)
    if "train" in fname:
        for other in ("test", "val"):
            cand = os.path.join(folder, fname.replace("train", other))
            if os.path.isfile(cand):
                return cand
    raise ValueError(
        f"file list {list_file!r} has no {split!r} split: give the test list itself, or name the "
        "lists '...train...' and '...test...' (or '...val...') side by side"
    )


def build_dataset(
    source: str | os.PathLike,
    split: str = "train",
    in_chans: int = 3,
    root: str | os.PathLike | None = None,
    download: bool = True,
    subset: int = 0,
    **decode,
):
    """Build a data set from a built-in name, a folder or a file list.

    Dispatch order: a built-in name (:data:`swav.data.builtin.BUILTIN_NAMES`,
    case-insensitive; write ``./cifar10`` to mean a folder of that name) ->
    :func:`~swav.data.builtin.load_builtin`; an existing directory ->
    :class:`ImageFolderDataset`; an existing file -> :class:`FileListDataset`.
    ``subset > 0`` keeps the first ``subset`` images.  Splits of folders and
    lists follow :func:`_folder_for_split` / :func:`_list_for_split`.
    ``decode``: the keyword arguments of :func:`decode_image` besides ``in_chans``
    (``min_size``, ``max_side``, ``mean_side``, ``max_pixels``), for image files only.
    """
    if split not in ("train", "test", "unlabeled"):
        raise ValueError(f"split must be 'train', 'test' or 'unlabeled', got {split!r}")
    src = os.fspath(source)
    key = builtin.canonical_name(src)
    if key is not None:
        ds = builtin.load_builtin(key, split=split, root=root, download=download, in_chans=in_chans)
    elif os.path.isdir(src):
        if split == "unlabeled":
            split = "train"
        ds = ImageFolderDataset(_folder_for_split(src, split), in_chans=in_chans, **decode)
    elif os.path.isfile(src):
        if split == "unlabeled":
            split = "train"
        ds = FileListDataset(_list_for_split(src, split), in_chans=in_chans, **decode)
    else:
        raise ValueError(
            f"unknown data source {src!r}: not a built-in data set ({', '.join(builtin.BUILTIN_NAMES)}), "
            "nor an existing folder of images, nor an existing file list"
        )
    ds = ds.subset(subset) if subset > 0 else ds
    if isinstance(ds, ImageFilesDataset):
        _check_some_usable(ds, "folder" if os.path.isdir(src) else "file list")
    return ds


#: files tried when a data set of image files is built (spread over it): none usable is refused
USABLE_PROBES = 32


def _check_some_usable(ds: ImageFilesDataset, kind: str) -> None:
    """EmptyDatasetError naming what was found when none of up to :data:`USABLE_PROBES` files spread
    over ``ds`` can be used (a folder of broken files, or of other files named like images). It
    stops at the first usable file: one decode for a good source."""
    n = len(ds)
    probes = np.unique(np.linspace(0, n - 1, min(n, USABLE_PROBES)).round().astype(np.int64))
    skipped: list[Skipped] = []
    for i in probes:
        item = ds[int(i)]
        if not isinstance(item, Skipped):
            return
        skipped.append(item)
    tried = f"the {n}" if len(probes) == n else f"{len(probes)} tried, spread over the {n},"
    examples = "; ".join(f"{os.path.basename(s.path)}: {s.reason}" for s in skipped[:3])
    raise EmptyDatasetError(
        f"{kind} {ds.name!r} holds {n} file(s) named like images, but none of {tried} can be used ({examples}"
        f"{'; ...' if len(skipped) > 3 else ''}): give a folder of images that open (JPEG, PNG, WebP, ...), "
        "or replace these files"
    )
