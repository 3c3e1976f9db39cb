"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Every file the project writes for later reading (the trainer's `config.json`, converted
checkpoints, benchmark results, downloads) goes through `atomic_path`: the content is written
to a temporary file in the same directory, flushed to disk, and renamed over the target with
`os.replace`, which is atomic on POSIX file systems. On any error the temporary file is
removed and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path to write to; renames it to `path` when the block succeeds.

    Args:
      path: the final file.
      suffix: appended to the temporary name, for writers that insist on an extension
        (``np.savez`` appends ".npz" unless the name ends with it).

    Yields:
      The temporary path, in the same directory as `path` (`os.replace` must not cross
      file systems).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # Durable before it becomes visible.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _to_json(value: Any) -> Any:
    """numpy / JAX scalars and arrays as numbers and lists; anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically (arrays as lists, other values as strings)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=_to_json)


def read_json(path: str) -> Any | None:
    """The JSON object in `path`, or None if the file does not exist.

    Raises:
      ValueError: if the file exists but is not valid JSON (the message names the file).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
