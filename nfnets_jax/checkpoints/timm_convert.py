"""Conversion between timm's `dm_nfnet_f*` PyTorch weights and this project's parameters.

timm (`timm.models.nfnet`) carries DeepMind's released F0-F6 weights under other names
and layouts (REFERENCE §6):

| timm key (stage s, block b)            | here (block n = global index)                   |
|----------------------------------------|-------------------------------------------------|
| stem.conv{1..4}.{weight,bias,gain}     | NFNet/~/stem_conv{0..3} {w, bias, gain}         |
| stages.s.b.conv1 / conv2 / conv2b / conv3 | nf_block_n/~/conv0 / conv1 / conv1b / conv2  |
| stages.s.b.downsample.conv             | nf_block_n/~/conv_shortcut                      |
| stages.s.b.attn_last.fc1 / fc2         | nf_block_n/~/squeeze_excite/~/linear / linear_1 |
| stages.s.b.skipinit_gain               | nf_block_n/skip_gain                            |
| final_conv / head.fc                   | NFNet/~/final_conv / NFNet/~/linear             |

Conv kernels are OIHW there and HWIO here; conv gains (O, 1, 1, 1) there, (O,) here; the
squeeze-excite layers are 1x1 convs (out, in, 1, 1) there and dense (in, out) kernels here;
the classifier is (out, in) there and (in, out) here. Both conversions only transpose and
reshape, so a round trip is exact.

timm's forward pass differs from the reference in two numeric details: exact (erf) GELU and
a weight-standardisation epsilon of 1e-5 added to the variance. `nfnet.NFNet(...,
numerics="timm")` reproduces both; everything else (TF-style SAME padding of every conv,
SAME 2x2 average pooling of the shortcut that divides by the unpadded count, gammas applied
after each activation, SE gain 2, the deep stem) is the same in timm's `dm_nfnet_f*` models.

The conversion itself needs only numpy (state dicts of numpy arrays or torch tensors).
Reading and writing `.pth` files and building timm models need PyTorch and timm; see
`import_timm` for the torchvision shim.
"""

import glob
import importlib
import importlib.util
import os
import re
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfnets_jax import files
from nfnets_jax.checkpoints import errors, released, tree

_CONV_NAMES = {
    "conv1": "conv0",
    "conv2": "conv1",
    "conv2b": "conv1b",
    "conv3": "conv2",
    "downsample.conv": "conv_shortcut",
}
_SE_NAMES = {"fc1": "linear", "fc2": "linear_1"}
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_torchvision_stub_library = None  # Keeps the stub registrations alive.


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # A torch tensor.
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _conv_from_timm(
    prefix: str, sd: Mapping[str, np.ndarray], used: set[str]
) -> dict[str, np.ndarray]:
    keys = [f"{prefix}.weight", f"{prefix}.gain", f"{prefix}.bias"]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise errors.CheckpointMismatchError(f"timm state dict lacks {', '.join(missing)}.")
    used.update(keys)
    weight, gain, bias = (sd[k] for k in keys)
    if weight.ndim != 4:
        raise errors.CheckpointMismatchError(
            f"{prefix}.weight has shape {weight.shape}, expected an OIHW conv kernel."
        )
    return {
        "w": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
        "gain": gain.reshape(gain.shape[0]),
        "bias": bias,
    }


def _dense_from_timm(
    prefix: str, sd: Mapping[str, np.ndarray], used: set[str]
) -> dict[str, np.ndarray]:
    keys = [f"{prefix}.weight", f"{prefix}.bias"]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise errors.CheckpointMismatchError(f"timm state dict lacks {', '.join(missing)}.")
    used.update(keys)
    weight = sd[keys[0]]
    weight = weight.reshape(weight.shape[0], weight.shape[1])  # 1x1 conv or linear: (out, in)
    return {"w": np.ascontiguousarray(weight.T), "b": sd[keys[1]]}


def timm_to_params(state_dict: Mapping[str, Any], root: str = "NFNet") -> released.Params:
    """Converts a timm `dm_nfnet_f*` state dict to this project's parameter tree.

    Args:
      state_dict: timm parameter names -> torch tensors or numpy arrays.
      root: the root module name of the target model.

    Returns:
      A two-level dict of float numpy arrays in the released layout.

    Raises:
      CheckpointMismatchError: keys are missing, or some keys are not NFNet-F parameters
        (they are listed).
    """
    sd = {k: _array(v) for k, v in state_dict.items()}
    used: set[str] = set()
    params: released.Params = {}
    blocks = sorted({(int(m[1]), int(m[2])) for m in map(_BLOCK_KEY.match, sd) if m})
    if not blocks:
        raise errors.CheckpointMismatchError(
            "no 'stages.<s>.<b>.*' keys: this is not a timm NFNet state dict."
        )
    for i in range(4):
        params[f"{root}/~/stem_conv{i}"] = _conv_from_timm(f"stem.conv{i + 1}", sd, used)
    for index, (stage, block) in enumerate(blocks):
        timm_prefix = f"stages.{stage}.{block}"
        name = tree.block_name(root, index)
        for timm_name, ours in _CONV_NAMES.items():
            if f"{timm_prefix}.{timm_name}.weight" in sd:
                params[f"{name}/~/{ours}"] = _conv_from_timm(f"{timm_prefix}.{timm_name}", sd, used)
        for timm_name, ours in _SE_NAMES.items():
            params[f"{name}/~/squeeze_excite/~/{ours}"] = _dense_from_timm(
                f"{timm_prefix}.attn_last.{timm_name}", sd, used
            )
        gain_key = f"{timm_prefix}.skipinit_gain"
        if gain_key not in sd:
            raise errors.CheckpointMismatchError(
                f"timm state dict lacks {gain_key} (a timm NFNet built without skipinit?)."
            )
        used.add(gain_key)
        params[name] = {"skip_gain": sd[gain_key].reshape(())}
    params[f"{root}/~/final_conv"] = _conv_from_timm("final_conv", sd, used)
    params[f"{root}/~/linear"] = _dense_from_timm("head.fc", sd, used)
    unused = sorted(set(sd) - used)
    if unused:
        listing = ", ".join(unused[:8]) + (
            f", ... and {len(unused) - 8} more" if len(unused) > 8 else ""
        )
        raise errors.CheckpointMismatchError(
            f"{len(unused)} timm keys have no counterpart in an NFNet-F model: {listing}."
        )
    return params


def params_to_timm(params: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Converts this project's NFNet parameters to a timm `dm_nfnet_f*` state dict (numpy).

    Use `to_torch` for tensors, or `save_timm_checkpoint` to write a `.pth` file.
    """
    arch = tree.describe(params)
    root = arch.root
    sd: dict[str, np.ndarray] = {}

    def conv(prefix: str, module: str) -> None:
        group = params[module]
        w = _array(group["w"])
        sd[f"{prefix}.weight"] = np.ascontiguousarray(w.transpose(3, 2, 0, 1))
        sd[f"{prefix}.bias"] = _array(group["bias"])
        sd[f"{prefix}.gain"] = _array(group["gain"]).reshape(-1, 1, 1, 1)

    def dense(prefix: str, module: str, as_conv: bool) -> None:
        w = _array(params[module]["w"]).T
        sd[f"{prefix}.weight"] = np.ascontiguousarray(w.reshape(*w.shape, 1, 1) if as_conv else w)
        sd[f"{prefix}.bias"] = _array(params[module]["b"])

    for i in range(4):
        conv(f"stem.conv{i + 1}", f"{root}/~/stem_conv{i}")
    index = 0
    for stage, depth in enumerate(arch.depths):
        for block in range(depth):
            prefix, name = f"stages.{stage}.{block}", tree.block_name(root, index)
            sd[f"{prefix}.skipinit_gain"] = _array(params[name]["skip_gain"]).reshape(())
            for timm_name, ours in _CONV_NAMES.items():
                if f"{name}/~/{ours}" in params:
                    conv(f"{prefix}.{timm_name}", f"{name}/~/{ours}")
            for timm_name, ours in _SE_NAMES.items():
                dense(
                    f"{prefix}.attn_last.{timm_name}",
                    f"{name}/~/squeeze_excite/~/{ours}",
                    as_conv=True,
                )
            index += 1
    conv("final_conv", f"{root}/~/final_conv")
    dense("head.fc", f"{root}/~/linear", as_conv=False)
    return sd


# ---------------------------------------------------------------------------------------
# PyTorch / timm side (optional dependencies).
# ---------------------------------------------------------------------------------------


def _import_torch() -> types.ModuleType:
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        raise ImportError(
            "PyTorch is needed for timm interop: pip install 'nfnets_jax[torch]' (torch, timm)."
        ) from e


def register_torchvision_stubs() -> bool:
    """Defines `torchvision::nms` / `qnms` as stub ops when torchvision's C++ ops cannot load.

    `import timm` imports torchvision, whose Python side registers fake kernels for its
    compiled `nms`/`qnms` operators and fails with "operator torchvision::nms does not
    exist" when the compiled library is missing or does not match the installed torch
    (e.g. no CPU build of torchvision). NFNets never call these operators, so declaring
    their schemas with `torch.library` is enough for the import to succeed. When the real
    library loads, nothing is stubbed. Must run before torchvision is first imported.

    Returns:
      Whether stubs were registered.
    """
    global _torchvision_stub_library
    torch = _import_torch()
    if _torchvision_stub_library is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False  # No torchvision: timm imports without it.
    for library in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(library)
            return False  # The real operators are available.
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_stub_library = lib
    return True


def import_timm() -> types.ModuleType:
    """Imports timm, registering the torchvision stubs first when needed.

    Raises:
      ImportError: torch or timm is not installed (install the "torch" extra).
    """
    _import_torch()
    register_torchvision_stubs()
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            "timm is needed for timm interop: pip install 'nfnets_jax[torch]'."
        ) from e


def to_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy state dict -> torch tensors (copies)."""
    torch = _import_torch()
    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def _unwrap(obj: Any) -> Mapping[str, Any]:
    # Training scripts often nest the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def load_timm_checkpoint(path: str) -> released.Params:
    """Reads a timm `.pth` (torch.save) and converts it to this project's parameters.

    Uses `torch.load(weights_only=True)`, which refuses arbitrary pickled objects.
    """
    torch = _import_torch()
    state_dict = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    return timm_to_params(state_dict)


def save_timm_checkpoint(params: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Writes this project's NFNet parameters as a timm `dm_nfnet_f*` state dict (.pth)."""
    torch = _import_torch()
    with files.atomic_path(path) as tmp:  # An interrupted write never leaves a torn .pth.
        torch.save(to_torch(params_to_timm(params)), tmp)
    return path
