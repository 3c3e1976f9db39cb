"""The released NFNet checkpoints (DeepMind, 2021) and a verified, cached download.

Each entry records the file's URL, its published md5 sum, the variant it holds and the
accuracy the paper reports for it (REFERENCE §5, §6). `resolve` turns a checkpoint argument
(a zoo name such as "F0", or a local path) into a local file, downloading zoo files into the
cache directory on first use. The cache directory is `$NFNETS_JAX_CACHE` when set, else
`~/.cache/nfnets_jax`. A download whose md5 does not match is deleted and refused.
"""

import dataclasses
import hashlib
import os
import shutil
import sys
import urllib.request
from typing import BinaryIO, TextIO

from nfnets_jax import files

CACHE_ENV = "NFNETS_JAX_CACHE"
_URL = "https://storage.googleapis.com/dm-nfnets/{name}_haiku.npz"


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint.

    Attributes:
        name: the zoo name ("F0".."F6").
        variant: the NFNet variant whose parameters the file holds.
        url: where the file is published.
        md5: its published md5 sum.
        top1: published ImageNet top-1 (%) at `test_imsize` with the paper's protocol.
        top5: published ImageNet top-5 (%).
        note: anything special about the run (F6 was trained with SAM).
    """

    name: str
    variant: str
    url: str
    md5: str
    top1: float
    top5: float
    note: str = ""

    @property
    def filename(self) -> str:
        return os.path.basename(self.url)


def _entry(name: str, md5: str, top1: float, top5: float, note: str = "") -> ZooEntry:
    return ZooEntry(
        name=name,
        variant=name,
        url=_URL.format(name=name),
        md5=md5,
        top1=top1,
        top5=top5,
        note=note,
    )


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _entry("F0", "0a41039da1cb43adf47f1b7d86ddfe0f", 83.6, 96.8),
        _entry("F1", "c9126bbfaf855f9ddb7ff3b902558781", 84.7, 97.1),
        _entry("F2", "7a018d8d1498020e2f5a8719a1e7f53f", 85.1, 97.3),
        _entry("F3", "d8e1e78d26db659c486150dbaccbe78a", 85.7, 97.5),
        _entry("F4", "f5974a7e3388aa81b91a9f1403e759a4", 85.9, 97.6),
        _entry("F5", "8639e925de951030651ac775b9f915c3", 86.0, 97.6),
        _entry("F6", "b16cca40ac1ecec2bd5e3273866da0c1", 86.5, 97.9, note="trained with SAM"),
    )
}


class ChecksumError(IOError):
    """A downloaded or cached file does not have the expected md5 sum."""


def cache_dir() -> str:
    """The directory zoo files are downloaded to ($NFNETS_JAX_CACHE or ~/.cache/nfnets_jax)."""
    path = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "nfnets_jax"
    )
    return os.path.abspath(path)


def md5sum(path: str, chunk_bytes: int = 1 << 20) -> str:
    """The hex md5 digest of the file at `path`."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(done: int, total: int | None, label: str, out: TextIO) -> None:
    if total:
        frac = min(done / total, 1.0)
        bar = "#" * int(30 * frac)
        out.write(f"\r{label} [{bar:<30}] {frac:6.1%} {done / 2**20:8.1f}/{total / 2**20:.1f} MiB")
    else:
        out.write(f"\r{label} {done / 2**20:8.1f} MiB")
    out.flush()


def _copy_with_progress(
    src: BinaryIO,
    dst: BinaryIO,
    total: int | None,
    label: str,
    out: TextIO | None,
    chunk_bytes: int = 1 << 20,
) -> str:
    """Copies `src` to `dst`, showing a progress bar on `out`; returns the md5 of the bytes."""
    digest = hashlib.md5()
    done = 0
    while chunk := src.read(chunk_bytes):
        dst.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if out is not None:
            _progress(done, total, label, out)
    if out is not None:
        out.write("\n")
        out.flush()
    if total is not None and done != total:
        raise OSError(f"{label}: download ended after {done} of {total} bytes.")
    return digest.hexdigest()


def download(
    url: str,
    path: str,
    md5: str | None = None,
    progress: TextIO | None = sys.stderr,
    timeout_s: float = 60.0,
) -> str:
    """Downloads `url` to `path` atomically, verifying its md5 sum.

    The bytes go to a temporary file next to `path`, which is renamed into place only when
    the md5 matches; on any failure (network error, short read, md5 mismatch) the partial
    file is removed and nothing is left at `path`.

    Args:
        url: an http(s):// or file:// URL.
        path: the destination file.
        md5: the expected hex md5 sum; None skips the check.
        progress: stream for the progress bar (None for silence).
        timeout_s: network timeout per blocking operation.

    Returns:
        `path`.

    Raises:
        ChecksumError: the downloaded bytes have another md5 sum.
        OSError: the download failed.
    """
    with files.atomic_path(path) as tmp:
        with open(tmp, "wb") as dst, urllib.request.urlopen(url, timeout=timeout_s) as src:
            length = src.headers.get("Content-Length") if hasattr(src, "headers") else None
            total = int(length) if length else None
            got = _copy_with_progress(src, dst, total, os.path.basename(path), progress)
        if md5 is not None and got != md5.lower():
            raise ChecksumError(
                f"md5 mismatch for {url}: expected {md5}, got {got}; the "
                f"download was deleted. Retry, or check the URL."
            )
    return path


def fetch(
    name: str,
    directory: str | None = None,
    progress: TextIO | None = sys.stderr,
    verify_cached: bool = True,
) -> str:
    """The local path of zoo checkpoint `name`, downloading it into the cache if needed.

    Args:
        name: a key of `ZOO` ("F0".."F6"; case-insensitive).
        directory: cache directory; default `cache_dir()`.
        progress: stream for the download progress bar (None for silence).
        verify_cached: re-check the md5 of an already cached file (a bad one is replaced).

    Returns:
        The path of the verified file.
    """
    entry = get(name)
    directory = directory or cache_dir()
    path = os.path.join(directory, entry.filename)
    if os.path.exists(path):
        if not verify_cached or md5sum(path) == entry.md5:
            return path
        if progress is not None:
            progress.write(f"{path} has a wrong md5 sum; downloading it again.\n")
        os.remove(path)
    return download(entry.url, path, entry.md5, progress=progress)


def get(name: str) -> ZooEntry:
    """The zoo entry called `name` (case-insensitive), with a clear error for unknown names."""
    entry = ZOO.get(name.upper())
    if entry is None:
        raise KeyError(f"{name!r} is not a released checkpoint; the zoo has {', '.join(ZOO)}.")
    return entry


def is_zoo_name(checkpoint: str) -> bool:
    """Whether `checkpoint` names a zoo entry (rather than a path)."""
    return checkpoint.upper() in ZOO


def resolve(checkpoint: str, progress: TextIO | None = sys.stderr) -> str:
    """Turns a checkpoint argument (zoo name, local path or gs:// URL) into a path.

    A zoo name is fetched into the cache (see `fetch`); an existing path or URL is returned
    as is. Anything else raises FileNotFoundError naming both possibilities.
    """
    path = files.local(checkpoint)  # `--checkpoint=~/x` reaches us unexpanded.
    if files.exists(path):
        return path
    if is_zoo_name(checkpoint):
        return fetch(checkpoint, progress=progress)
    raise FileNotFoundError(
        f"Checkpoint {checkpoint!r} is neither an existing path nor a zoo name ({', '.join(ZOO)})."
    )


def copy_into_cache(name: str, source: str) -> str:
    """Puts an already downloaded zoo file into the cache after checking its md5 sum.

    For machines without internet: download elsewhere, copy the file over, run this.
    """
    entry = get(name)
    got = md5sum(source)
    if got != entry.md5:
        raise ChecksumError(f"{source} has md5 {got}, but {entry.name} should be {entry.md5}.")
    path = os.path.join(cache_dir(), entry.filename)
    with files.atomic_path(path) as tmp:  # An interrupted copy never sits at `path`.
        shutil.copyfile(source, tmp)
    return path
