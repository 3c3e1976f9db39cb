"""A restricted unpickler for checkpoints: mappings, strings, numbers and numpy arrays only.

Unpickling normally imports and calls whatever the stream names, so a tampered file could
run arbitrary code. `load` resolves only an allow-list of pure data constructors (numpy's
array/dtype/scalar reconstruction, old Haiku's `FlatMapping`, a few of dill's helpers that
only rebuild arrays and builtin types, protocol-2 `_codecs.encode`) to functions of this
module, never importing the module a global names; any other global is refused with
`errors.UnsafeCheckpointError` before anything runs. `torch_load_error` turns a refusal of
torch's own restricted loader (`torch.load(weights_only=True)`) into that same error.
"""

import codecs
import collections
import io
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from nfnets_jax.checkpoints import errors

_PICKLE_PROTO = b"\x80"
# Numeric dtype kinds a checkpoint may hold: bool, signed, unsigned, float, complex.
_NUMERIC_KINDS = "biufc"
UnsafeCheckpointError = errors.UnsafeCheckpointError
CheckpointFormatError = errors.CheckpointFormatError


def _numpy_multiarray() -> Any:
    # numpy >= 2 moved numpy.core to numpy._core; both spellings appear in pickles.
    core = getattr(np, "_core", None) or np.core
    return core.multiarray


def _check_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafeCheckpointError(
            f"refusing numpy dtype {dtype!r}: only numeric arrays are allowed in a checkpoint."
        )
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """numpy's `_reconstruct` (the ndarray pickle path), for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(
            f"refusing to rebuild an array of type {subtype!r}: only numpy.ndarray is allowed."
        )
    return _numpy_multiarray()._reconstruct(np.ndarray, shape, typecode)


def _safe_scalar(dtype: Any, data: Any = None) -> np.generic:
    """numpy's `scalar` (the numpy-scalar pickle path), numeric dtypes only."""
    dtype = _check_dtype(dtype)
    if not isinstance(data, bytes):
        raise UnsafeCheckpointError("refusing a numpy scalar whose payload is not raw bytes.")
    return _numpy_multiarray().scalar(dtype, data)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """numpy's `_frombuffer` (protocol-5 array pickles), numeric dtypes only; a copy."""
    dtype = _check_dtype(dtype)
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer):
        raise UnsafeCheckpointError("refusing an array whose buffer is not raw bytes.")
    if order not in ("C", "F"):
        raise UnsafeCheckpointError(f"refusing array memory order {order!r}.")
    return np.frombuffer(buf, dtype).reshape(shape, order=order).copy(order=order)


def _safe_dtype(*args: Any) -> np.dtype:
    """`numpy.dtype(...)` as pickled: dtype(typestr, align, copy) followed by BUILD."""
    if not args or not isinstance(args[0], str):
        raise UnsafeCheckpointError(f"refusing numpy.dtype{args!r}: expected a type string.")
    return _check_dtype(np.dtype(*args))


def _safe_create_array(
    f: Callable[..., Any], args: Any, state: Any, npdict: Any = None
) -> np.ndarray:
    """dill's `_create_array(f, args, state, npdict)` for plain numeric ndarrays."""
    if f not in (_safe_reconstruct,):
        raise UnsafeCheckpointError(f"refusing dill._dill._create_array with {f!r}.")
    if npdict:
        raise UnsafeCheckpointError("refusing an ndarray subclass with an instance __dict__.")
    array = f(*args)
    array.__setstate__(state)
    _check_dtype(array.dtype)
    return array


def _safe_reconstruct_device_array(
    fun: Callable[..., Any], args: Any, arr_state: Any, aval_state: Any = None
) -> np.ndarray:
    """2021 jax pickled DeviceArrays as reconstruct_device_array(ndarray reduce parts)."""
    del aval_state  # weak_type / named_shape: meaningless for a numpy array.
    return _safe_create_array(fun, args, arr_state)


def _flat_mapping(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Old Haiku's `FlatMapping` pickled as `FlatMapping(dict)`: load it as that dict."""
    return dict(*args, **kwargs)


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}.")
    return codecs.encode(text, encoding, errors)


def _dill_create_dtypemeta(scalar_type: Any) -> type:
    """dill's `_create_dtypemeta(numpy scalar type)`: the dtype class, e.g. Float32DType."""
    if not (isinstance(scalar_type, type) and issubclass(scalar_type, np.generic)):
        raise UnsafeCheckpointError(f"refusing dill._dill._create_dtypemeta({scalar_type!r}).")
    return type(_check_dtype(scalar_type))


_DILL_BUILTIN_TYPES = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "str": str,
    "bytes": bytes,
    "int": int,
    "float": float,
    "bool": bool,
    "complex": complex,
    "NoneType": type(None),
}


def _dill_load_type(name: str) -> type:
    """dill's `_load_type(name)` for builtin data types only."""
    if name not in _DILL_BUILTIN_TYPES:
        raise UnsafeCheckpointError(
            f"refusing dill._dill._load_type({name!r}): only the data "
            f"types {sorted(_DILL_BUILTIN_TYPES)} are allowed."
        )
    return _DILL_BUILTIN_TYPES[name]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("haiku._src.data_structures", "FlatMapping"): _flat_mapping,
        ("haiku.data_structures", "FlatMapping"): _flat_mapping,
        # Older Haiku (2020) had a frozendict; loaded as a dict when pickled as frozendict(dict).
        ("haiku._src.data_structures", "frozendict"): _flat_mapping,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _codecs_encode,
        ("dill._dill", "_create_array"): _safe_create_array,
        ("dill._dill", "_create_dtypemeta"): _dill_create_dtypemeta,
        ("dill._dill", "_load_type"): _dill_load_type,
        ("jax.interpreters.xla", "reconstruct_device_array"): _safe_reconstruct_device_array,
        ("jax._src.device_array", "reconstruct_device_array"): _safe_reconstruct_device_array,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _safe_reconstruct
        allowed[(module, "scalar")] = _safe_scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _safe_frombuffer
    # Numpy scalar types (float32, int64, ...) are pure data classes; dtype pickles name them.
    for name in (
        "bool_",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ):
        allowed[("numpy", name)] = getattr(np, name)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals from `_ALLOWED_GLOBALS` only; never imports anything."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': a checkpoint may only contain "
                "mappings, strings, numbers and numpy arrays, and this pickle asks to import "
                "and call something else (a tampered or foreign file?). Nothing was run."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing persistent id {pid!r} in a checkpoint pickle.")


def _to_plain(tree: Any, path: str = "") -> Any:
    """Mappings -> dicts (recursively); leaves must be numeric numpy arrays or numbers."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if not isinstance(key, str):
                raise CheckpointFormatError(f"non-string key {key!r} under {path or 'the root'}.")
            out[key] = _to_plain(value, f"{path}/{key}" if path else key)
        return out
    if isinstance(tree, np.generic | int | float):
        tree = np.asarray(tree)
    if isinstance(tree, np.ndarray):
        _check_dtype(tree.dtype)
        return tree
    raise CheckpointFormatError(
        f"unexpected {type(tree).__name__} at {path or 'the root'}: a "
        "checkpoint holds only mappings of numpy arrays."
    )


def load(f: BinaryIO, name: str = "<stream>") -> Any:
    """Unpickles `f` with the allow-list; mappings come back as plain dicts.

    Args:
      f: a binary file positioned at the pickle's start.
      name: how error messages call the file.

    Returns:
      The unpickled tree: nested dicts of numeric numpy arrays.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside the allow-list.
      CheckpointFormatError: not a pickle, truncated, corrupt, or holding other objects.
    """
    head = f.read(1)
    if head != _PICKLE_PROTO:
        raise CheckpointFormatError(
            f"{name} is not a pickle (it starts with {head!r}, not b'\\x80'); expected a "
            "released NFNet checkpoint. `loading.load_params` also reads .npz and timm .pth."
        )
    f.seek(f.tell() - 1)
    try:
        tree = _RestrictedUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
        RecursionError,
    ) as e:
        raise CheckpointFormatError(
            f"{name} is truncated or corrupt: unpickling failed with {type(e).__name__}: {e}"
        ) from e
    if f.read(1):
        raise CheckpointFormatError(f"{name} has trailing bytes after the end of the pickle.")
    try:
        return _to_plain(tree)
    except RecursionError as e:
        raise CheckpointFormatError(f"{name} nests mappings too deeply for a checkpoint.") from e


def loads(data: bytes, name: str = "<bytes>") -> Any:
    """`load` for pickle bytes in memory."""
    return load(io.BytesIO(data), name=name)


# torch's refusal text, beyond its diagnosis, advises loading with weights_only=False (which
# runs the file's code) or allow-listing the global: sentences with these words are dropped.
_TORCH_ADVICE = ("weights_only", "safe_globals", "trusted", "torch.load", "http", "only load")
_TORCH_DIAGNOSIS = re.compile(r"unsupported|not an allowed|blocked", re.IGNORECASE)


def torch_load_error(name: str, error: BaseException) -> errors.CheckpointError:
    """The project's error for an `UnpicklingError` of `torch.load(weights_only=True)`.

    Args:
      name: the file, for the message.
      error: what torch raised.

    Returns:
      `UnsafeCheckpointError` when torch's restricted loader refused a global (nothing was
      run), keeping torch's diagnosis but none of its advice; else `CheckpointFormatError`
      (a corrupt pickle inside the archive).
    """
    text = str(error)
    if "weights only load failed" not in text.lower():
        return CheckpointFormatError(
            f"{name} is a damaged torch checkpoint: its pickle cannot be read "
            f"({type(error).__name__}: {text.strip().splitlines()[0] if text.strip() else ''})."
        )
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    diagnosis = [
        s
        for s in sentences
        if _TORCH_DIAGNOSIS.search(s) and not any(w in s.lower() for w in _TORCH_ADVICE)
    ]
    detail = " ".join(diagnosis) or "it names an object that is not a tensor or plain data."
    return UnsafeCheckpointError(
        f"refusing to load {name}: this torch pickle asks to import and call something other "
        "than tensors, numbers, strings and containers (a tampered, damaged or foreign "
        f"file?). torch's restricted loader reports: {detail} Nothing in the file was run; "
        "load only checkpoints that hold plain weights (e.g. convert them to .npz where they "
        "were made)."
    )
