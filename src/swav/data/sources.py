"""What a file given as a data source is, when it is not what swav reads there (a text file that
lists image paths): one image, or an archive of them. The first bytes decide (magic numbers), then
the name; the message says what was found and what to give instead.

Used by :class:`swav.data.datasets.FileListDataset` before it reads a file as a list. A leaf: it
imports nothing of the package.
"""
from __future__ import annotations

import os

__all__ = ["identify_file", "refuse_non_list_file"]

HEAD_BYTES = 512  # enough for every signature below (tar's is at offset 257)

# (signature at offset 0, kind) of image formats
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"),
)
# (signature at offset 0, kind) of archives and compressed files
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"),
)
_ARCHIVE_SUFFIXES = {
    ".zip": "zip", ".tar": "tar", ".tgz": "gzip", ".tbz": "bzip2", ".tbz2": "bzip2", ".txz": "xz", ".gz": "gzip",
    ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".7z": "7z", ".rar": "rar",
}
_TAR_NAMES = (".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst")


def _image_kind(head: bytes) -> str | None:
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif"):
        return "AVIF" if head[8:12] == b"avif" else "HEIC"
    if head[:2] == b"BM" and len(head) >= 26 and head[14:15] in (b"\x0c", b"(", b"@", b"l", b"|"):
        return "BMP"  # the size of the bitmap header after the 14-byte file header
    return None


def identify_file(path: str, image_extensions: tuple[str, ...]) -> tuple[str, str] | None:
    """``("image", "JPEG")``, ``("archive", "zip")``, ``("archive", "tar")``, ... for a file that is an
    image or an archive (by its first bytes, else by its name); None for anything else (a text file
    list, say)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    kind = _image_kind(head)
    if kind is not None:
        return "image", kind
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "archive", "tar"
    for magic, kind in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return "archive", kind
    name = os.path.basename(path).lower()
    ext = os.path.splitext(name)[1]
    if ext in image_extensions or ext in (".heic", ".avif", ".ico", ".jxl"):
        return "image", ext[1:].upper()
    if ext in _ARCHIVE_SUFFIXES:
        return "archive", _ARCHIVE_SUFFIXES[ext]
    return None


def _unpack_command(path: str, kind: str) -> str:
    name = os.path.basename(path)
    lower = name.lower()
    stem = next((name[: -len(s)] for s in sorted(_TAR_NAMES + tuple(_ARCHIVE_SUFFIXES), key=len, reverse=True)
                 if lower.endswith(s) and len(name) > len(s)), name + ".d")
    folder = os.path.join(os.path.dirname(path), stem)
    if kind == "zip":
        return f"unzip {path} -d {folder}"
    if kind == "7z":
        return f"7z x {path} -o{folder}"
    if kind == "rar":
        return f"unrar x {path} {folder}/"
    if kind == "tar" or lower.endswith(_TAR_NAMES):
        return f"mkdir -p {folder} && tar -xf {path} -C {folder}"
    return f"mkdir -p {folder} && tar -xf {path} -C {folder} (if it holds a tar archive; else decompress it)"


def refuse_non_list_file(path: str, image_extensions: tuple[str, ...]) -> None:
    """ValueError saying what ``path`` is and what to give instead, when it is an image file or an
    archive rather than a text file that lists image paths."""
    found = identify_file(path, image_extensions)
    if found is None:
        return
    what, kind = found
    if what == "image":
        folder = os.path.dirname(path) or "."
        raise ValueError(f"{path!r} is one image file ({kind}), not a folder of images or a file list: give the "
                         f"folder that holds your images (here {folder!r}), or a text file that lists image "
                         "paths, one per line")
    if kind in ("gzip", "bzip2", "xz", "zstd"):
        lower = path.lower()
        kind = f"{kind}-compressed tar" if lower.endswith(_TAR_NAMES) else f"{kind}-compressed"
    article = "an" if kind[0] in "aeiox" else "a"  # an xz-compressed ...
    raise ValueError(f"{path!r} is {article} {kind} archive: swav reads images from a folder, not from inside an "
                     f"archive; unpack it first ({_unpack_command(path, kind)}) and give that folder")
