"""Every file the project reads or writes for later, on a local disk or in cloud storage.

Paths are strings: local paths (``~`` expanded) or URLs. A URL's scheme must be one of
`SUPPORTED_SCHEMES` (``gs://``, Google Cloud Storage, which orbax, TensorBoard and
tensorflow's ``tf.io.gfile`` all reach); anything else is refused with `check_path`'s error.
URLs go through ``etils.epath`` (``tf.io.gfile`` for ``gs://`` when TensorFlow is installed,
as in orbax); local paths through ``os``, as before.

Atomicity: a reader sees the old file or the complete new one, never a torn one.
- Local: `write_bytes` / `write_json` / `atomic_path` write a temporary file in the same
  directory, fsync it and rename it over the target (`os.replace`, atomic on POSIX).
- Cloud storage has no rename (a "rename" is a copy then a delete), but a single object write
  is atomic: the new object becomes visible only when its upload completes, and until then
  readers get the old one. So a URL is written with one object write, never a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

# The URL schemes a workdir or output directory may use.
SUPPORTED_SCHEMES = ("gs",)


def is_url(path: str) -> bool:
    """Whether `path` is a URL (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def check_path(path: str, what: str = "path") -> str:
    """`path`, checked: a local path, or a URL of a supported scheme with a bucket.

    Raises:
      ValueError: naming `what`, the path and the supported schemes.
    """
    path = str(path)
    if not is_url(path):
        return path
    scheme, rest = path.split("://", 1)
    if scheme not in SUPPORTED_SCHEMES:
        supported = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        raise ValueError(
            f"{what} {path!r}: the URL scheme {scheme}:// is not supported; use a local "
            f"path or {supported} (Google Cloud Storage)."
        )
    if not rest.split("/", 1)[0]:
        raise ValueError(f"{what} {path!r} names no bucket: write {scheme}://<bucket>/<path>.")
    return path


def _epath(path: str) -> Any:
    from etils import epath  # Lazily: only URLs need it.

    return epath.Path(check_path(path))


def local(path: str) -> str:
    """A local path with ``~`` expanded; URLs unchanged."""
    return str(path) if is_url(path) else os.path.expanduser(str(path))


def absolute(path: str) -> str:
    """An absolute local path (``~`` expanded); URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    """`base`/`parts`: ``posixpath`` for URLs (``os.path`` would make "gs:/b" of "gs://b")."""
    return posixpath.join(str(base), *parts) if is_url(base) else os.path.join(local(base), *parts)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(local(path))


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(local(path))


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(local(path))


def listdir(path: str) -> list[str]:
    """The names in a directory (for a URL: the objects and prefixes one level below)."""
    if is_url(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(local(path)))


def makedirs(path: str) -> None:
    """Creates a directory and its parents (a no-op in cloud storage, which has none)."""
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(local(path), exist_ok=True)


def remove(path: str) -> None:
    if is_url(path):
        _epath(path).unlink()
    else:
        os.unlink(local(path))


def rmtree(path: str) -> None:
    """Removes a directory tree; a missing one is not an error."""
    if is_url(path):
        if _epath(path).exists():
            _epath(path).rmtree()
    else:
        shutil.rmtree(local(path), ignore_errors=True)


def rename(source: str, target: str) -> None:
    """Renames a file or directory.

    In cloud storage, object by object: every object is copied, then the sources are
    deleted, so an interruption leaves the source complete (and maybe a partial target).
    """
    if not is_url(source):
        os.rename(local(source), local(target))
        return
    src = _epath(source)
    _copy_tree(src, _epath(target))
    if src.is_dir():
        src.rmtree()
    else:
        src.unlink()


def _copy_tree(src: Any, dst: Any) -> None:
    if not src.is_dir():
        src.copy(dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        _copy_tree(child, dst / child.name)


def read_bytes(path: str) -> bytes:
    """The content of `path` (FileNotFoundError when it does not exist)."""
    if is_url(path):
        p = _epath(path)
        if not p.exists():
            raise FileNotFoundError(f"No such file: {path}")
        return p.read_bytes()
    with open(local(path), "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary local path to write to; renames it to `path` when the block succeeds.

    For writers that need a file name (``np.savez``, ``shutil.copyfile``). For a URL, the
    temporary file is local and its content is uploaded to `path` in one object write.

    Args:
      path: the final file.
      suffix: appended to the temporary name, for writers that insist on an extension
        (``np.savez`` appends ".npz" unless the name ends with it).

    Yields:
      The temporary path, in the same directory as a local `path` (`os.replace` must not
      cross file systems).
    """
    if is_url(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nfnets_upload_") as directory:
            tmp = os.path.join(directory, f"upload{suffix}")
            yield tmp
            with open(tmp, "rb") as f:
                write_bytes(path, f.read())
        return
    path = local(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # Durable before it becomes visible.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically (see the module docstring for how, per store)."""
    if is_url(path):
        _epath(path).write_bytes(data)  # One object write: visible only when complete.
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _to_json(value: Any) -> Any:
    """numpy / JAX scalars and arrays as numbers and lists; anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically (arrays as lists, other values as strings)."""
    write_text(path, json.dumps(obj, indent=indent, default=_to_json))


def read_json(path: str) -> Any | None:
    """The JSON object in `path`, or None if the file does not exist.

    Raises:
      ValueError: if the file exists but is not valid JSON (the message names the file).
    """
    try:
        text = read_text(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
