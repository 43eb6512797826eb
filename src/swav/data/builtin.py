"""Built-in data sets, read from their published binary formats (never pickle).

=============== ========================================================
name            files (in a data-set folder, see :func:`find_builtin_root`)
=============== ========================================================
fashion-mnist   ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
cifar10         ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``
                or the archive ``cifar-10-binary.tar.gz``
cifar100        ``cifar-100-binary/{train,test}.bin`` (fine labels)
                or the archive ``cifar-100-binary.tar.gz``
stl10           ``stl10_binary/{train,test}_{X,y}.bin``, ``unlabeled_X.bin``
                or the archive ``stl10_binary.tar.gz``
=============== ========================================================

Everything known about a built-in (aliases, image shape, classes, mean/std,
splits, files, official downloads and checksums, where to look) is one
:class:`BuiltinDataset` row of :data:`BUILTINS`; :data:`BUILTIN_NAMES`,
:data:`BUILTIN_CLASSES`, :data:`SOURCES` and :data:`SYSTEM_DIRS` are derived
from it.  This module imports only :mod:`swav.data.memory` and :mod:`swav.progress` of the
package.

Search order for a data set's folder: ``root`` (and ``root/<name>``),
``$SWAV_DATA/<name>``, ``~/.cache/swav/<name>``, then a system location (for
fashion-mnist the Debian/Ubuntu package ``dataset-fashion-mnist``, which
installs the four ``.gz`` files in ``/usr/share/datasets/fashion-mnist``).

Downloads go to ``root`` when given, else ``$SWAV_DATA/<name>``, else
``~/.cache/swav/<name>``; each file is streamed to a temporary file in that
folder, checked against the official MD5 in :data:`SOURCES`, and renamed into
place only when it matches.  Archives are unpacked next to themselves (only
regular files below the expected folder; a downloaded archive is deleted once
unpacked).  Checksums are checked on download only: local files are checked
for structure (idx magic numbers and sizes, record sizes, label ranges) -- the
Debian package, for one, ships recompressed ``.gz`` files whose MD5 differs
from the official one while their contents are the same.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swav.data.memory import TensorImageDataset
from swav.progress import Progress

__all__ = [
    "BUILTINS",
    "BUILTIN_CLASSES",
    "BUILTIN_NAMES",
    "SOURCES",
    "SYSTEM_DIRS",
    "BuiltinDataset",
    "ChecksumError",
    "DatasetNotFoundError",
    "MalformedDatasetError",
    "Source",
    "builtin_spec",
    "canonical_name",
    "download_file",
    "find_builtin_root",
    "load_builtin",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One official file: its name, download URLs (tried in order) and MD5."""

    filename: str
    urls: tuple[str, ...]
    md5: str


@dataclass(frozen=True)
class BuiltinDataset:
    """The facts of one built-in data set (one row of :data:`BUILTINS`).

    name:             canonical name (what :func:`canonical_name` returns);
    aliases:          other accepted spellings, lower case (matching ignores case and
                      surrounding blanks);
    shape:            ``(channels, height, width)`` of its images;
    classes:          class names in label order (a class-names file shipped with the data,
                      ``class_names_file``, replaces them when it names them all);
    mean, std:        per-channel mean and standard deviation of its pixels, in [0, 1];
    splits:           the splits :func:`load_builtin` accepts;
    files:            split -> the files that split needs (for ``format="idx"`` the names
                      without ``.gz``: both are found);
    sources:          official downloads, key -> :class:`Source` (``archive``, or
                      ``<split>-images`` / ``<split>-labels`` for loose idx files);
    archive_dir:      the folder the archive unpacks to; None: no archive (loose idx files);
    format:           which reader: ``idx`` (fashion-mnist), ``cifar`` (fixed-size binary
                      records: ``label_bytes`` label bytes, the last one the label, then the
                      image), ``stl10`` (column-major images ``<split>_X.bin``, labels 1..N in
                      ``<split>_y.bin``);
    system_dirs:      system-wide folders searched last;
    how_to_get:       the not-found message's hint (``{url}`` = where to download from).
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]
    sources: Mapping[str, Source]
    archive_dir: str | None
    format: str
    system_dirs: tuple[str, ...]
    how_to_get: str
    class_names_file: str | None = None
    label_bytes: int = 0

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def download_keys(self, split: str) -> list[str]:
        """The keys of :attr:`sources` to download for ``split``."""
        if self.archive_dir is None:
            return [f"{split}-images", f"{split}-labels"]
        return ["archive"]


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_sources(url: str, files: Mapping[str, tuple[str, ...]], md5s: Mapping[str, str]) -> dict[str, Source]:
    """``<split>-images`` / ``<split>-labels`` -> the gzipped idx file ``<name>.gz`` at ``url``."""
    out = {}
    for split, (images, labels) in files.items():
        for kind, base in (("images", images), ("labels", labels)):
            key = f"{split}-{kind}"
            out[key] = Source(base + ".gz", (url + base + ".gz",), md5s[key])
    return out


def _archive(url: str, md5: str) -> dict[str, Source]:
    return {"archive": Source(url.rsplit("/", 1)[1], (url,), md5)}


_CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm"
).split()

#: The built-in data sets, canonical name -> facts; official files and MD5 checksums are from the
#: data sets' own pages.  Everything in :mod:`swav.data` about a built-in comes from here.
BUILTINS: dict[str, BuiltinDataset] = {
    "fashion-mnist": BuiltinDataset(
        name="fashion-mnist",
        aliases=("fashion_mnist", "fashionmnist", "fmnist"),
        shape=(1, 28, 28),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mean=(0.2860,), std=(0.3530,),
        splits=("train", "test"),
        files=_FMNIST_FILES,
        sources=_idx_sources(_FMNIST_URL, _FMNIST_FILES, {
            "train-images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test-images": "bef4ecab320f06d8554ea6380940ec79",
            "test-labels": "bb300cfdad3c16e7a12a480ee83cd310",
        }),
        archive_dir=None,
        format="idx",
        system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist package
        how_to_get="install the Debian/Ubuntu package (apt-get install dataset-fashion-mnist), or put "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz (from {url}) in $SWAV_DATA/fashion-mnist or ~/.cache/swav/fashion-mnist",
    ),
    "cifar10": BuiltinDataset(
        name="cifar10",
        aliases=("cifar-10", "cifar_10"),
        shape=(3, 32, 32),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        splits=("train", "test"),
        files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        sources=_archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                         "c32a1d4ab5d03f1284b67883e8d87530"),
        archive_dir="cifar-10-batches-bin",
        format="cifar",
        label_bytes=1,
        class_names_file="batches.meta.txt",
        system_dirs=(),
        how_to_get="put cifar-10-binary.tar.gz (the BINARY version, {url}) or its extracted cifar-10-batches-bin/ "
        "in $SWAV_DATA/cifar10 or ~/.cache/swav/cifar10",
    ),
    "cifar100": BuiltinDataset(
        name="cifar100",
        aliases=("cifar-100", "cifar_100"),
        shape=(3, 32, 32),
        classes=tuple(_CIFAR100_FINE),
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        splits=("train", "test"),
        files={"train": ("train.bin",), "test": ("test.bin",)},
        sources=_archive("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                         "03b5dce01913d631647c71ecec9e9cb8"),
        archive_dir="cifar-100-binary",
        format="cifar",
        label_bytes=2,  # coarse, fine: the fine label is used
        class_names_file="fine_label_names.txt",
        system_dirs=(),
        how_to_get="put cifar-100-binary.tar.gz (the BINARY version, {url}) or its extracted cifar-100-binary/ "
        "in $SWAV_DATA/cifar100 or ~/.cache/swav/cifar100",
    ),
    "stl10": BuiltinDataset(
        name="stl10",
        aliases=("stl-10", "stl_10"),
        shape=(3, 96, 96),
        classes=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
        mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
        splits=("train", "test", "unlabeled"),
        files={"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
               "unlabeled": ("unlabeled_X.bin",)},
        sources=_archive("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                         "91f7769df0f17e558f3565bffb0c7dfb"),
        archive_dir="stl10_binary",
        format="stl10",
        class_names_file="class_names.txt",
        system_dirs=(),
        how_to_get="put stl10_binary.tar.gz ({url}) or its extracted stl10_binary/ in $SWAV_DATA/stl10 or "
        "~/.cache/swav/stl10",
    ),
}

# --------------------------------------------------------------------------- #
# Derived from BUILTINS
# --------------------------------------------------------------------------- #
BUILTIN_NAMES: tuple[str, ...] = tuple(BUILTINS)

_ALIASES: dict[str, str] = {alias: spec.name for spec in BUILTINS.values() for alias in (spec.name, *spec.aliases)}

BUILTIN_CLASSES: dict[str, list[str]] = {name: list(spec.classes) for name, spec in BUILTINS.items()}

#: Official files and MD5 checksums, name -> key -> :class:`Source` (copies of
#: ``BUILTINS[name].sources``: this is what searching and downloading read, so a mirror or a
#: test can replace an entry).
SOURCES: dict[str, dict[str, Source]] = {name: dict(spec.sources) for name, spec in BUILTINS.items()}

#: System-wide locations searched last (Debian's dataset-fashion-mnist package); read at search
#: time, so a test can replace an entry.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {name: spec.system_dirs for name, spec in BUILTINS.items()}


class DatasetNotFoundError(FileNotFoundError):
    """The files of a built-in data set are not on disk (and were not downloaded)."""


class ChecksumError(RuntimeError):
    """A downloaded file does not have its official checksum."""


class MalformedDatasetError(ValueError):
    """A data-set file exists but does not have the expected format."""


def canonical_name(name: str) -> str | None:
    """The built-in name for ``name`` (case and ``-``/``_`` insensitive), else None."""
    return _ALIASES.get(str(name).strip().lower())


def builtin_spec(name: str) -> BuiltinDataset | None:
    """The :class:`BuiltinDataset` that ``name`` (any accepted spelling) names, else None."""
    key = canonical_name(name)
    return None if key is None else BUILTINS[key]


def _check_name(name: str) -> str:
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown built-in data set {name!r}; built-in names: {', '.join(BUILTIN_NAMES)}")
    return key


def _check_split(name: str, split: str) -> None:
    splits = BUILTINS[name].splits
    if split not in splits:
        raise ValueError(f"{name} has splits {', '.join(splits)}, not {split!r}")


def _cache_dir(name: str) -> Path:
    env = os.environ.get("SWAV_DATA")
    if env:
        return Path(env).expanduser() / name
    return Path.home() / ".cache" / "swav" / name


def _search_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r, r / name]
    env = os.environ.get("SWAV_DATA")
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(Path.home() / ".cache" / "swav" / name)
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


# --------------------------------------------------------------------------- #
# Which files a split needs, and where they are
# --------------------------------------------------------------------------- #
def _default_splits(name: str, split: str | None) -> tuple[str, ...]:
    if split is not None:
        return (split,)
    return ("train", "test")


def _idx_file(d: Path, base: str) -> Path | None:
    for cand in (d / (base + ".gz"), d / base):
        if cand.is_file():
            return cand
    return None


def _locate_in(name: str, d: Path, splits: tuple[str, ...]) -> tuple[str, Path] | None:
    """('files', folder) when ``d`` holds the unpacked files, ('archive', path)
    when it holds the archive, else None."""
    if not d.is_dir():
        return None
    spec = BUILTINS[name]
    if spec.archive_dir is None:
        if all(_idx_file(d, b) is not None for s in splits for b in spec.files[s]):
            return ("files", d)
        return None
    needed = [f for s in splits for f in spec.files[s]]
    for folder in (d / spec.archive_dir, d):
        if all((folder / f).is_file() for f in needed):
            return ("files", folder)
    archive = d / SOURCES[name]["archive"].filename
    if archive.is_file():
        return ("archive", archive)
    return None


def find_builtin_root(name: str, root: str | os.PathLike | None = None, split: str | None = None) -> Path | None:
    """The first folder holding data set ``name`` (files or archive), else None.

    Searched in order: ``root``, ``root/<name>``, ``$SWAV_DATA/<name>``,
    ``~/.cache/swav/<name>``, :data:`SYSTEM_DIRS` (``split=None`` asks for the
    train and test splits).
    """
    name = _check_name(name)
    splits = _default_splits(name, split)
    for d in _search_dirs(name, root):
        if _locate_in(name, d, splits) is not None:
            return d
    return None


# --------------------------------------------------------------------------- #
# Download and unpack
# --------------------------------------------------------------------------- #


def download_file(url: str, dest: str | os.PathLike, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, checking its MD5, showing its progress in bytes
    (:class:`swav.progress.Progress`: a live line with rate and time left on a terminal, a log line
    per 10 % elsewhere).

    The bytes go to a temporary file in ``dest``'s folder, renamed to ``dest``
    only when the MD5 matches.  On a mismatch the temporary file is deleted and
    :class:`ChecksumError` names the file and both checksums; on any other
    failure the temporary file is deleted and the error propagates.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            size = resp.headers.get("Content-Length")
            with Progress(int(size) if size and size.isdigit() else None, f"downloading {dest.name}", unit="B",
                          log=log) as bar:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        got = h.hexdigest()
        if got != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected md5 {md5.lower()}, "
                f"got md5 {got}; the partial file was deleted"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _download(name: str, keys: list[str], target: Path) -> None:
    for key in keys:
        src = SOURCES[name][key]
        dest = target / src.filename
        if dest.is_file():
            continue
        errors = []
        for url in src.urls:
            log.info("downloading %s to %s", url, dest)
            try:
                download_file(url, dest, src.md5)
                break
            except ChecksumError:
                raise
            except (OSError, ValueError) as e:  # URLError is an OSError
                errors.append(f"{url}: {e}")
        else:
            raise OSError("; ".join(errors))


def _safe_extract(archive: Path, out_dir: Path, prefix: str) -> Path:
    """Unpack the regular files below ``prefix/`` of a tar archive into
    ``out_dir`` (no links, no absolute or ``..`` paths); returns ``out_dir/prefix``."""
    final = out_dir / prefix
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                parts = Path(m.name).parts
                if not m.isfile() or not parts or parts[0] != prefix or ".." in parts or os.path.isabs(m.name):
                    continue
                dest = out_dir.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
                try:
                    with os.fdopen(fd, "wb") as out, src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, PermissionError):
            raise
        raise MalformedDatasetError(f"cannot unpack archive {archive}: {e}") from None
    return final


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #
def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                return g.read()
        except (OSError, EOFError) as e:
            raise MalformedDatasetError(f"{path}: corrupt gzip file ({e})") from None
    return path.read_bytes()


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzip or not), checking magic and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise MalformedDatasetError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or nd != ndim:
        raise MalformedDatasetError(
            f"{path}: bad idx magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            f"(expected 0x{0x0800 | ndim:08x}: unsigned bytes, {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MalformedDatasetError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise MalformedDatasetError(
            f"{path}: idx header declares shape {dims} ({expected} bytes) but the file holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if labels.size and int(labels.max()) >= n_classes:
        raise MalformedDatasetError(f"{path}: label {int(labels.max())} out of range 0..{n_classes - 1}")


def _load_idx(spec: BuiltinDataset, d: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_base, lab_base = spec.files[split]
    img_path, lab_path = _idx_file(d, img_base), _idx_file(d, lab_base)
    assert img_path is not None and lab_path is not None
    images = read_idx(img_path, 3)
    labels = read_idx(lab_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise MalformedDatasetError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels"
        )
    _check_labels(lab_path, labels, spec.num_classes)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_cifar(spec: BuiltinDataset, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    name, n_label_bytes = spec.name, spec.label_bytes  # cifar100: coarse, fine
    rec = n_label_bytes + int(np.prod(spec.shape))
    imgs, labs = [], []
    for fname in spec.files[split]:
        path = folder / fname
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % rec:
            raise MalformedDatasetError(
                f"{path}: size {raw.size} bytes is not a positive multiple of the {rec}-byte {name} record"
            )
        raw = raw.reshape(-1, rec)
        lab = raw[:, n_label_bytes - 1]  # cifar100: the fine label
        _check_labels(path, lab, spec.num_classes)
        labs.append(lab.astype(np.int64))
        imgs.append(raw[:, n_label_bytes:].reshape(-1, *spec.shape))
    images = np.concatenate(imgs) if len(imgs) > 1 else imgs[0].copy()
    return torch.from_numpy(images), torch.from_numpy(np.concatenate(labs))


def _load_stl10(spec: BuiltinDataset, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    rec = int(np.prod(spec.shape))
    x_path = folder / spec.files[split][0]  # <split>_X.bin
    size = x_path.stat().st_size
    if size == 0 or size % rec:
        raise MalformedDatasetError(
            f"{x_path}: size {size} bytes is not a positive multiple of {rec} ({'x'.join(map(str, spec.shape))})"
        )
    n = size // rec
    # copy-on-write memory map: the 2.8 GB unlabeled split is not read into RAM
    mm = np.memmap(x_path, dtype=np.uint8, mode="c", shape=(n, *spec.shape))
    # images are stored column-major: each channel plane is (W, H)
    images = torch.from_numpy(mm).transpose(2, 3)
    if split == "unlabeled":
        return images, None
    y_path = folder / spec.files[split][1]  # <split>_y.bin
    y = np.fromfile(y_path, dtype=np.uint8)
    if y.size != n:
        raise MalformedDatasetError(f"{y_path} holds {y.size} labels but {x_path} holds {n} images")
    k = spec.num_classes
    if y.size and (int(y.min()) < 1 or int(y.max()) > k):
        raise MalformedDatasetError(f"{y_path}: labels must be 1..{k}, found {int(y.min())}..{int(y.max())}")
    return images, torch.from_numpy(y.astype(np.int64) - 1)


#: format -> reader ``(spec, folder, split) -> (images, labels or None)``
_READERS = {"idx": _load_idx, "cifar": _load_cifar, "stl10": _load_stl10}


def _read_class_names(folder: Path, fname: str, n: int) -> list[str] | None:
    p = folder / fname
    if not p.is_file():
        return None
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return None
    names = [x for x in names if x]
    return names if len(names) == n else None


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def _not_found(name: str, split: str, dirs: list[Path], reason: str) -> DatasetNotFoundError:
    spec = BUILTINS[name]
    url = next(iter(SOURCES[name].values())).urls[0]
    url = url.rsplit("/", 1)[0] + "/" if spec.archive_dir is None else url  # loose files: their folder
    looked = "\n".join(f"  - {d}" for d in dirs)
    return DatasetNotFoundError(
        f"built-in data set {name!r} (split {split!r}) not found; looked in:\n{looked}\n"
        f"{reason}\nTo get it: {spec.how_to_get.format(url=url)}, or call with download=True."
    )


def _find_or_download(name: str, split: str, root: str | os.PathLike | None,
                      download: bool) -> tuple[str, Path, bool]:
    """``(kind, where, downloaded)``: what :func:`_locate_in` found for ``split`` in the search
    folders, else in the download target after downloading (when ``download``)."""
    splits = (split,)
    dirs = _search_dirs(name, root)
    for d in dirs:
        found = _locate_in(name, d, splits)
        if found is not None:
            return (*found, False)
    if not download:
        raise _not_found(name, split, dirs, "download=False, so nothing was downloaded.")
    target = Path(root).expanduser() if root is not None else _cache_dir(name)
    try:
        _download(name, BUILTINS[name].download_keys(split), target)
    except ChecksumError:
        raise
    except OSError as e:
        raise _not_found(name, split, dirs, f"Download into {target} failed: {e}") from e
    found = _locate_in(name, target, splits)
    if found is None:
        raise _not_found(name, split, dirs, f"The files downloaded into {target} are incomplete.")
    return (*found, True)


def _unpack(name: str, split: str, archive: Path, downloaded: bool) -> Path:
    """Unpack ``archive`` next to itself (into the cache when that is read-only); the folder
    holding the files of ``split``. A downloaded archive is deleted once unpacked."""
    spec = BUILTINS[name]
    prefix = spec.archive_dir
    try:
        folder = _safe_extract(archive, archive.parent, prefix)
    except PermissionError:  # read-only location: unpack into the cache instead
        folder = _safe_extract(archive, _cache_dir(name), prefix)
    missing = [f for f in spec.files[split] if not (folder / f).is_file()]
    if missing:
        raise MalformedDatasetError(f"archive {archive} lacks {', '.join(prefix + '/' + m for m in missing)}")
    if downloaded:
        archive.unlink(missing_ok=True)
    return folder


def load_builtin(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
    in_chans: int | None = None,
) -> TensorImageDataset:
    """Load built-in data set ``name`` (see :data:`BUILTIN_NAMES`) as a
    :class:`~swav.data.memory.TensorImageDataset`.

    ``split``: ``train`` or ``test`` (and ``unlabeled`` for stl10, which has
    no labels).  ``in_chans``: convert channels (1 -> 3 repeats grey, 3 -> 1 is
    luma); None keeps the native count (1 for fashion-mnist, 3 otherwise).
    Files are searched as in :func:`find_builtin_root`; when missing and
    ``download`` is true they are downloaded and checked (see module doc).
    """
    name = _check_name(name)
    _check_split(name, split)
    kind, where, downloaded = _find_or_download(name, split, root, download)
    if kind == "archive":
        where = _unpack(name, split, where, downloaded)
    spec = BUILTINS[name]
    images, labels = _READERS[spec.format](spec, where, split)
    classes = list(spec.classes)
    if spec.class_names_file is not None:
        classes = _read_class_names(where, spec.class_names_file, len(classes)) or classes
    ds = TensorImageDataset(images, labels, classes if labels is not None else None, name=f"{name}:{split}")
    return ds.with_channels(in_chans)
