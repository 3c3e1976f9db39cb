"""The released NFNet checkpoint format, the `.npz` format, and loading any checkpoint.

The released F0-F6 files (REFERENCE §6) are pickles written with dill and 2021-era Haiku,
despite their `.npz` name; `load_released` reads them with `safe_pickle` (nothing in the
file is ever imported or called) into a plain `dict[str, dict[str, np.ndarray]]`.
`save_npz` writes such a tree as a standard numpy `.npz` archive keyed "module/param",
loadable with `allow_pickle=False`: the recommended format for later use.
`convert_released` does both steps; `load_params` opens any supported checkpoint (zoo name,
released pickle, `.npz`, timm `.pth`).
"""

import os
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from nfnets_jax.checkpoints import errors, safe_pickle, zoo

Params = dict[str, dict[str, np.ndarray]]
CheckpointFormatError = errors.CheckpointFormatError
_PICKLE_PROTO = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"


def load_released(path: str) -> Params:
    """Loads a released NFNet checkpoint (a dill pickle) without running untrusted code.

    Args:
      path: the local file (see `zoo.resolve` for zoo names).

    Returns:
      A two-level dict `module_path -> {param_name: np.ndarray}`.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list.
      CheckpointFormatError: the file is not a pickle, is truncated, or is not a two-level
        mapping of numeric arrays.
    """
    with open(path, "rb") as f:
        tree = safe_pickle.load(f, name=path)
    return check_two_level(tree, path)


def check_two_level(tree: Any, name: str = "checkpoint") -> Params:
    """Checks that `tree` is `{module: {param: ndarray}}` and returns it."""
    if not isinstance(tree, dict) or not tree:
        raise CheckpointFormatError(f"{name} does not hold a non-empty mapping of modules.")
    for module, params in tree.items():
        if not isinstance(params, dict):
            raise CheckpointFormatError(
                f"{name}: module {module!r} holds a "
                f"{type(params).__name__}, not a mapping of parameters."
            )
        for param, value in params.items():
            if not isinstance(value, np.ndarray):
                raise CheckpointFormatError(
                    f"{name}: {module}/{param} is a {type(value).__name__}, not an array."
                )
    return tree


def flatten(params: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """`{module: {param: x}}` -> `{"module/param": np.ndarray}`."""
    flat = {}
    for module, group in params.items():
        for param, value in group.items():
            if "/" in param:
                raise ValueError(f"parameter name {param!r} of {module!r} contains '/'.")
            flat[f"{module}/{param}"] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
    """`{"module/param": x}` -> `{module: {param: x}}` (the last '/' splits)."""
    params: Params = {}
    for key, value in flat.items():
        module, sep, param = key.rpartition("/")
        if not sep:
            raise CheckpointFormatError(f"key {key!r} is not of the form 'module/param'.")
        params.setdefault(module, {})[param] = np.asarray(value)
    return params


def save_npz(params: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Writes parameters as an uncompressed `.npz` keyed "module/param" (no pickles).

    Args:
      params: a two-level mapping of arrays (numpy or jax).
      path: destination; numpy appends ".npz" when missing, and so does the returned path.

    Returns:
      The path written.
    """
    if not path.endswith(".npz"):
        path += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flatten(params))
    os.replace(tmp, path)
    return path


def load_npz(path: str) -> Params:
    """Reads a `save_npz` file with `allow_pickle=False`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise CheckpointFormatError(
            f"{path} is not a readable .npz archive of plain arrays ({type(e).__name__}: {e})."
        ) from e
    return check_two_level(unflatten(flat), path)


def convert_released(src: str, dst: str) -> str:
    """Safely loads a released pickle checkpoint and writes it as `.npz` (see `save_npz`)."""
    return save_npz(load_released(src), dst)


def sniff_format(path: str) -> str:
    """The checkpoint format of `path`: "pickle", "npz", "torch", "orbax" or "unknown"."""
    if os.path.isdir(path):
        return "orbax"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == _PICKLE_PROTO:
        return "pickle"
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    return "unknown"


def load_params(checkpoint: str, progress: TextIO | None = sys.stderr) -> Params:
    """Loads parameters from a zoo name, a released pickle, an `.npz` or a timm `.pth`.

    Args:
      checkpoint: a zoo name ("F0".."F6") or a local path.
      progress: stream for a zoo download's progress bar; None for silence.

    Returns:
      A two-level dict of numpy arrays in this project's layout.

    Raises:
      CheckpointFormatError: the file's format is not recognised (the message says what
        the first bytes look like).
    """
    path = zoo.resolve(checkpoint, progress=progress)
    fmt = sniff_format(path)
    if fmt == "pickle":
        return load_released(path)
    if fmt == "npz":
        return load_npz(path)
    if fmt == "torch":
        # Imported here: timm_convert imports this module.
        from nfnets_jax.checkpoints import timm_convert

        return timm_convert.load_timm_checkpoint(path)
    if fmt == "orbax":
        raise CheckpointFormatError(
            f"{path} is a directory; for a training workdir use "
            "`nfnets_jax.evaluation.load_workdir_params` (orbax)."
        )
    raise CheckpointFormatError(
        f"{path} is not a known checkpoint format (a released pickle, .npz archive or torch .pth)."
    )
