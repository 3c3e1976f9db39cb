"""The released NFNet checkpoint format and the project's pickle-free `.npz` format.

The released F0-F6 files (REFERENCE §6) are pickles written with dill and 2021-era Haiku,
despite their `.npz` name; `load_released` reads them with `safe_pickle` (nothing in the
file is ever imported or called) into a plain `dict[str, dict[str, np.ndarray]]`.
`save_npz` writes such a tree as a standard numpy `.npz` archive keyed "module/param",
loadable with `allow_pickle=False`: the recommended format for later use.
`convert_released` does both steps. `checkpoints.loading` opens any checkpoint format.
"""

import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfnets_jax import files
from nfnets_jax.checkpoints import errors, safe_pickle

Params = dict[str, dict[str, np.ndarray]]


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
        raise errors.CheckpointFormatError(f"{name} does not hold a non-empty mapping of modules.")
    for module, params in tree.items():
        if not isinstance(params, dict):
            raise errors.CheckpointFormatError(
                f"{name}: module {module!r} holds a "
                f"{type(params).__name__}, not a mapping of parameters."
            )
        for param, value in params.items():
            if not isinstance(value, np.ndarray):
                raise errors.CheckpointFormatError(
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
            raise errors.CheckpointFormatError(f"key {key!r} is not of the form 'module/param'.")
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
    with files.atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **flatten(params))
    return path


def load_npz(path: str) -> Params:
    """Reads a `save_npz` file with `allow_pickle=False`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise errors.CheckpointFormatError(
            f"{path} is not a readable .npz archive of plain arrays ({type(e).__name__}: {e})."
        ) from e
    return check_two_level(unflatten(flat), path)


def convert_released(src: str, dst: str) -> str:
    """Safely loads a released pickle checkpoint and writes it as `.npz` (see `save_npz`)."""
    return save_npz(load_released(src), dst)
