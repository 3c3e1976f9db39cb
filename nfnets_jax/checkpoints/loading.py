"""The one entry point that opens any checkpoint: `load_params` and `load`.

A checkpoint argument is a zoo name ("F0".."F6", fetched and md5-checked into the cache), a
released pickle (read by the restricted unpickler), a `.npz` written by `released.save_npz`,
a timm `.pth`, or a training workdir (its newest orbax checkpoint, EMA weights by default).
`load` also reads the model off the parameters and checks the tree against it.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from typing import Any, TextIO

from nfnets_jax import files
from nfnets_jax.checkpoints import errors, released, safe_pickle, timm_convert, tree, zoo

_PICKLE_PROTO = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"


def sniff_format(path: str) -> str:
    """The checkpoint format of `path`: "pickle", "npz", "torch", "orbax", "damaged" (a zip
    archive, the container of .npz and .pth files, that cannot be opened) or "unknown".

    Raises:
      ValueError: `path` is a file in cloud storage (only training workdirs are read there).
    """
    if files.isdir(path):
        return "orbax"
    if files.is_url(path):
        raise ValueError(
            f"{path} is a checkpoint file in cloud storage; training workdirs are read there "
            f"directly, files from a local copy: gcloud storage cp {path} ."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == _PICKLE_PROTO:
        return "pickle"
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "damaged"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    return "unknown"


def load_params(
    checkpoint: str, progress: TextIO | None = sys.stderr, ema: bool = True
) -> released.Params:
    """Parameters of any checkpoint, as a two-level dict of numpy arrays.

    Args:
      checkpoint: a zoo name or a local path (file or training workdir).
      progress: stream for a zoo download's progress bar; None for silence.
      ema: for training workdirs, the EMA parameters when the checkpoint has them.

    Returns:
      `{module: {param: np.ndarray}}` in this project's (the release's) layout.

    Raises:
      CheckpointFormatError: the file's format is not recognised, or it is truncated.
      UnsafeCheckpointError: the file asks to run code (a pickle global outside the
        allow-list, or one torch's restricted loader refuses).
      CheckpointReadError: a training workdir none of whose checkpoints can be read.
      FileNotFoundError: neither an existing path nor a zoo name.
    """
    path = zoo.resolve(checkpoint, progress=progress)
    fmt = sniff_format(path)
    if fmt == "orbax":
        from nfnets_jax.checkpoints import workdir  # orbax: the "train" extra.

        return workdir.load_params(path, ema=ema)
    if fmt == "pickle":
        return released.load_released(path)
    if fmt == "npz":
        return released.load_npz(path)
    if fmt == "torch":
        return _load_torch(path)
    if fmt == "damaged":
        raise errors.CheckpointFormatError(
            f"{path} is a damaged or truncated file: it starts like a zip archive (an .npz or "
            "torch .pth checkpoint) but its directory of members cannot be read. Copy or "
            "download it again."
        )
    raise errors.CheckpointFormatError(
        f"{path} is not a known checkpoint format (a released pickle, .npz archive, torch "
        ".pth or training workdir)."
    )


def _load_torch(path: str) -> released.Params:
    """A timm `.pth`; torch's refusals and pickle errors become the project's errors."""
    try:
        return timm_convert.load_timm_checkpoint(path)
    except pickle.UnpicklingError as e:
        # `from None`: torch's own text advises weights_only=False, i.e. running the file.
        raise safe_pickle.torch_load_error(path, e) from None


def load(
    checkpoint: str,
    variant: str | None = None,
    ema: bool = True,
    progress: TextIO | None = sys.stderr,
) -> tuple[released.Params, dict[str, Any]]:
    """Parameters of any checkpoint and the `nfnet.NFNet` arguments that fit them.

    Args:
      checkpoint: see `load_params`.
      variant: the expected variant; None detects it from the parameters (custom trees get
        explicit depths / widths).
      ema: for workdirs, take the EMA parameters when present.
      progress: stream for a zoo download's progress bar.

    Returns:
      (params, model_kwargs) where `model_kwargs` includes variant, num_classes and numerics
      ("timm" for timm files, else "reference").

    Raises:
      CheckpointMismatchError: the parameters do not fit `variant` (listing the differences).
    """
    params = load_params(checkpoint, progress=progress, ema=ema)
    fmt = sniff_format(zoo.resolve(checkpoint, progress=None))
    kwargs = tree.model_kwargs(params)
    if variant is not None:
        kwargs = {"variant": variant, "num_classes": kwargs["num_classes"]}
    kwargs["numerics"] = "timm" if fmt == "torch" else "reference"
    model_args = {k: v for k, v in kwargs.items() if k not in ("variant", "num_classes")}
    tree.validate(params, kwargs["variant"], kwargs["num_classes"], **model_args)
    return params, kwargs
