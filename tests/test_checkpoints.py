"""Tests for the safe loader of the released format, the .npz format and tree validation."""

import contextlib
import os
import pickle
import sys
import types

import dill
import jax
import numpy as np
import pytest
from absl import app

from nfnets_jax.checkpoints import errors, loading, released, safe_pickle, tree

TINY = dict(depths=(1, 1, 1, 1), widths=(16, 32, 32, 32), group_width=8)


@pytest.fixture(scope="module")
def tiny_params():
    # Random values in the exact tree of a tiny NFNet (eval_shape: no compilation).
    rng = np.random.default_rng(0)
    shapes = tree.expected_shapes("F0", num_classes=10, **TINY)
    return {
        m: {p: rng.normal(size=s).astype(np.float32) for p, s in g.items()}
        for m, g in shapes.items()
    }


def assert_trees_equal(got, want):
    assert type(got) is dict
    assert sorted(got) == sorted(want)
    for module in want:
        assert type(got[module]) is dict
        assert sorted(got[module]) == sorted(want[module])
        for name, value in want[module].items():
            assert isinstance(got[module][name], np.ndarray)
            assert got[module][name].dtype == value.dtype
            np.testing.assert_array_equal(got[module][name], value)


@contextlib.contextmanager
def fake_haiku_flat_mapping():
    """A class named FlatMapping in a module named haiku._src.data_structures (pickling only).

    2021 Haiku's FlatMapping pickled as FlatMapping(dict); the loader must rebuild that as a
    dict without importing haiku's class.
    """
    name = "haiku._src.data_structures"
    module = types.ModuleType(name)

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    FlatMapping.__module__ = name
    FlatMapping.__qualname__ = "FlatMapping"
    module.FlatMapping = FlatMapping
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield FlatMapping
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def test_tiny_model_has_released_layout(tiny_params):
    assert "NFNet/~/stem_conv0" in tiny_params and "NFNet/~/linear" in tiny_params
    assert tiny_params["NFNet/~/nf_block_3"]["skip_gain"].shape == ()
    assert len(tiny_params) == 10 + 7 * 4


@pytest.mark.parametrize(
    "dump",
    [dill.dumps, lambda t: pickle.dumps(t, protocol=2), lambda t: pickle.dumps(t, protocol=5)],
    ids=["dill", "pickle2", "pickle5"],
)
def test_released_roundtrip_exact(tmp_path, tiny_params, dump):
    path = tmp_path / "F_tiny_haiku.npz"
    path.write_bytes(dump(tiny_params))
    assert_trees_equal(released.load_released(str(path)), tiny_params)


@pytest.mark.filterwarnings("ignore:Cannot locate reference")
def test_released_flat_mapping_wrapper(tmp_path, tiny_params):
    with fake_haiku_flat_mapping() as flat_mapping:
        wrapped = flat_mapping({m: flat_mapping(g) for m, g in tiny_params.items()})
        # byref: the real class was importable in 2021, so dill pickled it by reference.
        data = dill.dumps(wrapped, byref=True)
    assert b"haiku._src.data_structures" in data and b"FlatMapping" in data
    real_module = sys.modules.get("haiku._src.data_structures")
    path = tmp_path / "flat.npz"
    path.write_bytes(data)
    assert_trees_equal(released.load_released(str(path)), tiny_params)
    # Loading did not touch (or import) the real haiku module.
    assert sys.modules.get("haiku._src.data_structures") is real_module


def test_legacy_numpy_core_path(tiny_params):
    # 2021 numpy pickled arrays via numpy.core.multiarray._reconstruct; protocol 2 spells
    # globals as text, so renaming the module in the stream reproduces an old file.
    data = pickle.dumps(tiny_params, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in data
    legacy = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert legacy != data
    assert_trees_equal(safe_pickle.loads(legacy), tiny_params)


def test_numpy_scalars_load_as_arrays():
    data = pickle.dumps({"m": {"s": np.float32(2.5), "i": np.int64(3)}})
    out = safe_pickle.loads(data)
    assert out["m"]["s"].dtype == np.float32 and out["m"]["s"] == 2.5
    assert out["m"]["i"].dtype == np.int64 and out["m"]["i"] == 3


class _RunsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(
    "payload, global_name", [(_RunsSystem, "posix.system"), (_RunsEval, "builtins.eval")]
)
def test_refuses_code_and_never_runs_it(tmp_path, payload, global_name, tiny_params):
    marker = tmp_path / "side_effect"
    evil = {"NFNet/~/linear": {"w": payload(marker)}}
    evil.update({k: v for k, v in tiny_params.items() if k != "NFNet/~/linear"})
    for dump in (dill.dumps, pickle.dumps):
        path = tmp_path / "evil.npz"
        path.write_bytes(dump(evil))
        with pytest.raises(errors.UnsafeCheckpointError, match=global_name.replace(".", r"\.")):
            released.load_released(str(path))
        assert not marker.exists()
    # Sanity: the payload does run under a plain unpickler.
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()


def test_refuses_globals_hidden_inside_allowed_helpers():
    # dill's _create_array with a forbidden callable, and an object-dtype array.
    forbidden = pickle.dumps({"m": {"w": np.array([1, "x"], dtype=object)}})
    with pytest.raises(errors.UnsafeCheckpointError, match="object|dtype"):
        safe_pickle.loads(forbidden)
    sneaky = (
        b"\x80\x04\x8c\ndill._dill\x8c\r_create_array\x93\x8c\x08builtins\x8c\x04eval"
        b"\x93\x8c\x041+1)\x85NN\x87R."
    )
    with pytest.raises(errors.UnsafeCheckpointError, match=r"builtins\.eval"):
        safe_pickle.loads(sneaky)


def test_truncated_and_non_pickle_files(tmp_path, tiny_params):
    data = dill.dumps(tiny_params)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CheckpointFormatError, match="truncated or corrupt"):
        released.load_released(str(truncated))
    text = tmp_path / "notes.npz"
    text.write_bytes(b"these are not weights\n")
    with pytest.raises(errors.CheckpointFormatError, match="is not a pickle"):
        released.load_released(str(text))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(errors.CheckpointFormatError, match="is not a pickle"):
        released.load_released(str(empty))
    with pytest.raises(errors.CheckpointFormatError, match="format"):
        loading.load_params(str(text))


def test_non_mapping_pickle_is_refused(tmp_path):
    path = tmp_path / "list.npz"
    path.write_bytes(pickle.dumps([np.zeros(3)]))
    with pytest.raises(errors.CheckpointFormatError, match="holds only mappings"):
        released.load_released(str(path))


def test_convert_to_npz_and_load_params_any_format(tmp_path, tiny_params):
    src = tmp_path / "tiny_haiku.npz"
    src.write_bytes(dill.dumps(tiny_params))
    dst = released.convert_released(str(src), str(tmp_path / "tiny_converted"))
    assert dst.endswith(".npz")
    with np.load(dst, allow_pickle=False) as archive:
        assert "NFNet/~/nf_block_1/~/conv1/w" in archive.files
        assert "NFNet/~/nf_block/skip_gain" in archive.files
    assert_trees_equal(released.load_npz(dst), tiny_params)
    assert loading.sniff_format(str(src)) == "pickle"
    assert loading.sniff_format(dst) == "npz"
    assert_trees_equal(loading.load_params(str(src)), tiny_params)
    assert_trees_equal(loading.load_params(dst), tiny_params)


def _shapes_as_arrays(shapes):
    # Zero-stride views: full-size trees (F0..F7) without allocating their memory.
    return {
        m: {p: np.broadcast_to(np.float32(0), s) for p, s in g.items()} for m, g in shapes.items()
    }


@pytest.mark.parametrize("variant", ["F0", "F2", "F1+"])
def test_detect_variant(variant):
    params = _shapes_as_arrays(tree.expected_shapes(variant))
    assert tree.detect_variant(params) == variant
    arch = tree.describe(params)
    assert arch.num_classes == 1000
    assert arch.final_conv_ch == 2 * arch.widths[-1]


def test_describe_tiny_and_unknown_variant(tiny_params):
    arch = tree.describe(tiny_params)
    assert arch.depths == (1, 1, 1, 1) and arch.widths == (16, 32, 32, 32)
    assert arch.num_classes == 10
    with pytest.raises(errors.CheckpointMismatchError, match=r"depths \[1, 1, 1, 1\]"):
        tree.detect_variant(tiny_params)


def test_f1_loaded_as_f0_names_the_mismatch():
    f1 = _shapes_as_arrays(tree.expected_shapes("F1"))
    with pytest.raises(errors.CheckpointMismatchError) as info:
        tree.validate(f1, "F0")
    message = str(info.value)
    assert "variant F0" in message and "holds F1" in message
    assert "unexpected: NFNet/~/nf_block_12/" in message
    # F0's second block starts a stage (it has a shortcut conv); F1's does not.
    assert "missing: NFNet/~/nf_block_1/~/conv_shortcut/bias" in message
    tree.validate(f1, "F1")  # The right variant passes.


def test_validate_reports_mis_shaped_and_missing(tiny_params):
    bad = {m: dict(g) for m, g in tiny_params.items()}
    bad["NFNet/~/final_conv"]["w"] = np.zeros((1, 1, 32, 63), np.float32)
    del bad["NFNet/~/stem_conv2"]["gain"]
    bad["NFNet/~/extra"] = {"w": np.zeros(3)}
    diff = tree.compare_trees(bad, tree.expected_shapes("F0", 10, **TINY))
    assert diff.missing == ("NFNet/~/stem_conv2/gain",)
    assert diff.unexpected == ("NFNet/~/extra/w",)
    assert diff.mis_shaped == (("NFNet/~/final_conv/w", (1, 1, 32, 63), (1, 1, 32, 64)),)
    with pytest.raises(errors.CheckpointMismatchError, match="1 mis-shaped: NFNet/~/final_conv"):
        tree.validate(bad, "F0", **TINY)
    tree.validate(tiny_params, "F0", **TINY)
    assert not tree.compare_trees(tiny_params, jax.tree.map(np.shape, tiny_params))


def test_command_line_info_and_to_npz(tmp_path, tiny_params, capsys):
    from nfnets_jax.checkpoints import __main__ as cli

    src = tmp_path / "tiny_haiku.npz"
    src.write_bytes(dill.dumps(tiny_params))
    cli.main(["checkpoints", "info", str(src)])
    out = capsys.readouterr().out
    assert "format: pickle" in out and "depths [1, 1, 1, 1]" in out and "10 classes" in out
    cli.main(["checkpoints", "to-npz", str(src), str(tmp_path / "out.npz")])
    assert_trees_equal(released.load_npz(str(tmp_path / "out.npz")), tiny_params)
    cli.main(["checkpoints", "list"])
    with pytest.raises(app.UsageError, match="Unknown command .lst."):
        cli.main(["checkpoints", "lst"])
    with pytest.raises(app.UsageError, match="info takes 1 argument"):
        cli.main(["checkpoints", "info"])
    assert "0a41039da1cb43adf47f1b7d86ddfe0f" in capsys.readouterr().out


def test_deeply_nested_pickle_is_a_format_error():
    # 50k nested dicts: {'a': {'a': ...}} built directly from opcodes.
    data = b"\x80\x04" + b"}\x8c\x01a" * 50000 + b"}" + b"s" * 50000 + b"."
    with pytest.raises(errors.CheckpointFormatError, match="too deeply"):
        safe_pickle.loads(data)


def test_2021_jax_device_array_pickles_load_as_numpy():
    # jax (2021) pickled DeviceArrays as reconstruct_device_array(<ndarray reduce parts>).
    name = "jax.interpreters.xla"
    fake = types.ModuleType(name)

    def reconstruct_device_array(fun, args, arr_state, aval_state):
        raise AssertionError("the loader must not call jax")

    reconstruct_device_array.__module__ = name
    reconstruct_device_array.__qualname__ = "reconstruct_device_array"
    fake.reconstruct_device_array = reconstruct_device_array

    class DeviceArray:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            fun, args, state = self.value.__reduce__()
            return reconstruct_device_array, (fun, args, state, {"weak_type": False})

    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    saved = sys.modules.get(name)
    sys.modules[name] = fake
    try:
        data = pickle.dumps({"NFNet/~/linear": {"w": DeviceArray(value)}})
    finally:
        sys.modules[name] = saved
    assert b"reconstruct_device_array" in data
    out = safe_pickle.loads(data)
    np.testing.assert_array_equal(out["NFNet/~/linear"]["w"], value)
