"""Tests for nfnets_jax.agc: the AGC rule, masks, layouts, statistics, jit/pmap, errors."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfnets_jax import agc, treepaths
from nfnets_jax.models import nfnet, registry

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
CLASSIFIER_W = "NFNet/~/linear/w"


# ----------------------------------------------------------------------------- helpers


def np_unit_norms(x: np.ndarray, unit_axis: int = -1) -> np.ndarray:
    """Float64 per-unit norms following REFERENCE section 3 (keepdims)."""
    x = np.asarray(x, np.float64)
    if x.ndim <= 1 or sum(d != 1 for d in x.shape) <= 1:
        return np.sqrt(np.sum(x * x, keepdims=True))
    axis = unit_axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def np_agc_leaf(g: np.ndarray, w: np.ndarray, clipping: float, eps: float = 1e-3) -> np.ndarray:
    """Independent NumPy implementation of the reference rule, written as in the paper."""
    g_norm = np_unit_norms(g)
    w_norm = np.maximum(np_unit_norms(w), eps)
    trigger = g_norm / w_norm > clipping
    scale = clipping * w_norm / np.maximum(g_norm, 1e-6)
    return np.where(trigger, np.asarray(g, np.float64) * scale, g)


def clip(tree_g, tree_w, clipping, **kwargs):
    tx = agc.adaptive_grad_clip(clipping, **kwargs)
    return tx.update(tree_g, tx.init(tree_w), tree_w)


SHAPES = st.sampled_from(
    [
        (),
        (1,),
        (7,),
        (1, 5),
        (5, 1),
        (6, 4),
        (3, 3, 2, 4),
        (1, 1, 8, 3),
        (2, 2, 2, 2, 3),
        (1, 1, 1, 5),
        (4, 1, 1, 1),
        (8, 16),
        (3, 3, 4, 1),
    ]
)
LOG_SCALES = st.floats(min_value=-4.0, max_value=3.0)


@st.composite
def leaf_pairs(draw, zero_prob=True):
    shape = draw(SHAPES)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w_scale = 10.0 ** draw(LOG_SCALES)
    g_scale = 10.0 ** draw(LOG_SCALES)
    w = (rng.standard_normal(shape) * w_scale).astype(np.float32)
    # Give every unit a different gradient scale so both clipped and unclipped units occur.
    g = rng.standard_normal(shape) * g_scale
    if len(shape) >= 2:
        g = g * 10.0 ** rng.uniform(-2, 2, size=shape[-1])
    g = g.astype(np.float32)
    if zero_prob:
        if draw(st.booleans()) and draw(st.booleans()):
            w = np.zeros_like(w)
        if draw(st.booleans()) and draw(st.booleans()):
            g = np.zeros_like(g)
    return g, w


# ----------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(pair=leaf_pairs(), clipping=st.floats(min_value=1e-3, max_value=1.0))
def test_bound_holds_and_small_units_unchanged(pair, clipping):
    g, w = pair
    out, state = clip({"p": jnp.asarray(g)}, {"p": jnp.asarray(w)}, clipping)
    out = np.asarray(out["p"])
    assert out.dtype == np.float32 and out.shape == g.shape
    assert np.all(np.isfinite(out))
    max_norm = clipping * np.maximum(np_unit_norms(w), 1e-3)
    out_norm = np.broadcast_to(np_unit_norms(out), g.shape)
    assert np.all(out_norm <= np.broadcast_to(max_norm, g.shape) * (1 + 1e-5))
    # Units clearly under the bound keep their exact bits; units clearly over are rescaled.
    ratio = np.broadcast_to(np_unit_norms(g) / max_norm, g.shape)
    under = ratio < 1 - 1e-5
    np.testing.assert_array_equal(out[under], g[under])
    over = ratio > 1 + 1e-5
    np.testing.assert_allclose(out_norm[over], np.broadcast_to(max_norm, g.shape)[over], rtol=1e-5)
    # The state counts exactly the rescaled units.
    units = np_unit_norms(g).size
    n_over = int(np.sum(np_unit_norms(g) / max_norm > 1 + 1e-5))
    n_under = int(np.sum(np_unit_norms(g) / max_norm < 1 - 1e-5))
    assert n_over <= int(state.num_clipped) <= units - n_under
    np.testing.assert_allclose(float(state.clipped_fraction), int(state.num_clipped) / units)


@PROPERTY_SETTINGS
@given(pair=leaf_pairs(), clipping=st.floats(min_value=1e-3, max_value=1.0))
def test_clipping_twice_equals_clipping_once(pair, clipping):
    g, w = pair
    once, _ = clip({"p": jnp.asarray(g)}, {"p": jnp.asarray(w)}, clipping)
    twice, _ = clip(once, {"p": jnp.asarray(w)}, clipping)
    np.testing.assert_allclose(np.asarray(twice["p"]), np.asarray(once["p"]), rtol=1e-6, atol=0)


@PROPERTY_SETTINGS
@given(a=leaf_pairs(), b=leaf_pairs(), clip_a=st.booleans())
def test_masked_leaves_untouched(a, b, clip_a):
    grads = {"a": jnp.asarray(a[0]), "b": jnp.asarray(b[0])}
    params = {"a": jnp.asarray(a[1]), "b": jnp.asarray(b[1])}
    mask = {"a": clip_a, "b": False}
    out, _ = clip(grads, params, 1e-3, mask=mask)
    np.testing.assert_array_equal(np.asarray(out["b"]), b[0])
    expected_a = np_agc_leaf(a[0], a[1], 1e-3) if clip_a else a[0]
    np.testing.assert_allclose(np.asarray(out["a"]), expected_a, rtol=2e-5, atol=0)


@PROPERTY_SETTINGS
@given(shape=SHAPES, clipping=st.floats(min_value=1e-3, max_value=1.0), g_scale=LOG_SCALES)
def test_zero_weights_and_zero_gradients_no_nan(shape, clipping, g_scale):
    rng = np.random.default_rng(0)
    zeros = jnp.zeros(shape, jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape) * 10.0**g_scale, jnp.float32)
    out, _ = clip(
        {"zero_g": zeros, "zero_w": g, "both": zeros},
        {"zero_g": g, "zero_w": zeros, "both": zeros},
        clipping,
    )
    for leaf in jax.tree.leaves(out):
        assert not np.any(np.isnan(np.asarray(leaf)))
    np.testing.assert_array_equal(np.asarray(out["zero_g"]), 0.0)
    np.testing.assert_array_equal(np.asarray(out["both"]), 0.0)
    # With zero weights the bound is clipping * eps per unit.
    bound = clipping * 1e-3 * (1 + 1e-5)
    assert np.all(np_unit_norms(np.asarray(out["zero_w"])) <= bound)


# ----------------------------------------------------------------------------- equivalence


@PROPERTY_SETTINGS
@given(
    pairs=st.lists(leaf_pairs(zero_prob=False), min_size=1, max_size=3),
    clipping=st.floats(min_value=1e-3, max_value=1.0),
)
def test_matches_optax_adaptive_grad_clip(pairs, clipping):
    grads = [jnp.asarray(g) for g, _ in pairs]
    params = [jnp.asarray(w) for _, w in pairs]
    ours, _ = clip(grads, params, clipping)
    ref = optax.adaptive_grad_clip(clipping)
    theirs, _ = ref.update(grads, ref.init(params), params)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-30)


@functools.cache
def f0_shapes():
    forward = hk.transform(lambda x: nfnet.NFNet(variant="F0")(x, is_training=True))
    return jax.eval_shape(
        lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    )


def random_tree(shapes, seed):
    """Random float32 values for a tree of shapes, with varied scales per leaf and per unit."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shapes)
    out = []
    for leaf in leaves:
        # Cheap randomness for 71M values: a random block repeated to the leaf's size.
        x = np.resize(rng.standard_normal(min(leaf.size, 1 << 18), dtype=np.float32), leaf.shape)
        x *= np.float32(10.0 ** rng.uniform(-3, 1))
        if leaf.ndim >= 2:
            x *= (10.0 ** rng.uniform(-1.5, 1.5, size=leaf.shape[-1])).astype(np.float32)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def test_full_f0_tree_matches_numpy_reference():
    shapes = f0_shapes()
    params = random_tree(shapes, 0)
    grads = jax.tree.map(lambda x: x * np.float32(0.02), random_tree(shapes, 1))
    tx = agc.adaptive_grad_clip(0.01, mask=registry.agc_mask)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    total_units = 0
    total_clipped = 0
    for (path, g), w, o in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0],
        jax.tree.leaves(params),
        jax.tree.leaves(out),
        strict=True,
    ):
        name = treepaths.path_to_str(path)
        o = np.asarray(o)
        if name == CLASSIFIER_W:
            np.testing.assert_array_equal(o, g, err_msg=name)
            continue
        np.testing.assert_allclose(o, np_agc_leaf(g, w, 0.01), rtol=2e-5, atol=0, err_msg=name)
        ratio = np_unit_norms(g) / np.maximum(np_unit_norms(w), 1e-3)
        total_units += ratio.size
        total_clipped += int(np.sum(ratio > 0.01))
    # The random scales give a real mix of clipped and unclipped units.
    assert 0.1 < total_clipped / total_units < 0.9
    assert abs(int(state.num_clipped) - total_clipped) <= 2
    np.testing.assert_allclose(
        float(state.clipped_fraction), total_clipped / total_units, atol=1e-4
    )


# ----------------------------------------------------------------------------- dtypes, jit, pmap


def test_norms_in_float32_output_in_gradient_dtype():
    # In float16 the squared norm of these gradients overflows (>65504); AGC must not.
    w = {"k": jnp.ones((4, 3), jnp.float16)}
    g = {"k": jnp.full((4, 3), 1000.0, jnp.float16)}
    out, state = clip(g, w, 0.01)
    assert out["k"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out["k"], np.float32), 0.01, rtol=1e-3)
    assert int(state.num_clipped) == 3


def test_jit_and_pmap_with_bf16_gradients():
    n = jax.local_device_count()
    assert n == 8, "conftest should provide 8 fake CPU devices"
    rng = np.random.default_rng(0)
    params = {
        "conv": {
            "w": rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
            "gain": np.ones(8, np.float32),
        },
        "linear": {
            "w": rng.standard_normal((8, 5)).astype(np.float32),
            "b": np.zeros(5, np.float32),
        },
    }
    per_device_grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal((n,) + x.shape) * 0.3, jnp.bfloat16), params
    )
    tx = agc.adaptive_grad_clip(0.05, track_per_param=True)
    state = tx.init(params)

    def step(grads, state, params):
        grads = jax.lax.pmean(grads, axis_name="batch")
        return tx.update(grads, state, params)

    replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), t)
    out, new_state = jax.pmap(step, axis_name="batch")(
        per_device_grads, replicate(state), replicate(params)
    )
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(leaf, np.float32), np.asarray(leaf[:1], np.float32).repeat(n, 0)
        )
    mean_grads = jax.tree.map(
        lambda x: jnp.mean(x, 0, dtype=jnp.float32).astype(jnp.bfloat16), per_device_grads
    )
    single, single_state = jax.jit(tx.update)(mean_grads, state, params)
    for a, b, g, w in zip(
        jax.tree.leaves(out),
        jax.tree.leaves(single),
        jax.tree.leaves(mean_grads),
        jax.tree.leaves(params),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(a[0], np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-6
        )
        expected = np_agc_leaf(np.asarray(g, np.float32), w, 0.05).astype(jnp.bfloat16)
        np.testing.assert_allclose(
            np.asarray(b, np.float32), np.asarray(expected, np.float32), rtol=1e-2, atol=1e-6
        )
    np.testing.assert_array_equal(
        np.asarray(new_state.clipped_fraction), float(new_state.clipped_fraction[0])
    )
    assert float(single_state.clipped_fraction) > 0
    assert set(new_state.per_param_clipped_fraction) == {
        "conv/gain",
        "conv/w",
        "linear/b",
        "linear/w",
    }


def test_bf16_unclipped_units_keep_their_bits():
    w = {"k": jnp.ones((4, 3), jnp.float32)}
    g = jnp.asarray([[1e-3, 5.0, 1e-4]] * 4, jnp.bfloat16)
    out, _ = jax.jit(lambda g, w: clip({"k": g}, w, 0.01))(g, w)
    out = np.asarray(out["k"], np.float32)
    np.testing.assert_array_equal(out[:, [0, 2]], np.asarray(g, np.float32)[:, [0, 2]])
    np.testing.assert_allclose(np.linalg.norm(out[:, 1]), 0.02, rtol=1e-2)


# ----------------------------------------------------------------------------- layouts


def test_unit_axis_zero_matches_transposed_haiku_layout():
    rng = np.random.default_rng(1)
    w_hwio = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    g_hwio = (rng.standard_normal((3, 3, 4, 6)) * 0.3).astype(np.float32)
    w_dense = rng.standard_normal((5, 7)).astype(np.float32)
    g_dense = (rng.standard_normal((5, 7)) * 0.3).astype(np.float32)
    to_oihw = lambda x: np.transpose(x, (3, 2, 0, 1))
    haiku_out, _ = clip({"c": g_hwio, "d": g_dense}, {"c": w_hwio, "d": w_dense}, 0.05)
    torch_out, _ = clip(
        {"c": to_oihw(g_hwio), "d": g_dense.T},
        {"c": to_oihw(w_hwio), "d": w_dense.T},
        0.05,
        unit_axis=0,
    )
    np.testing.assert_allclose(
        np.asarray(torch_out["c"]), to_oihw(np.asarray(haiku_out["c"])), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(torch_out["d"]), np.asarray(haiku_out["d"]).T, rtol=1e-6)
    # Without the right axis the result differs: the layout matters.
    wrong, _ = clip({"d": g_dense.T}, {"d": w_dense.T}, 0.05)
    assert not np.allclose(np.asarray(wrong["d"]), np.asarray(haiku_out["d"]).T)


def test_per_leaf_unit_axes_tree_and_callable():
    rng = np.random.default_rng(2)
    params = {
        "dense_out_in": rng.standard_normal((6, 4)).astype(np.float32),
        "dense_in_out": rng.standard_normal((4, 6)).astype(np.float32),
        "matrix_as_one_unit": rng.standard_normal((4, 6)).astype(np.float32),
    }
    grads = jax.tree.map(lambda x: x * 0.2, params)
    axes = {"dense_out_in": 0, "dense_in_out": -1, "matrix_as_one_unit": None}
    from_tree, _ = clip(grads, params, 0.05, unit_axis=axes)
    from_fn, _ = clip(grads, params, 0.05, unit_axis=lambda p: axes)
    expected = {
        "dense_out_in": np_agc_leaf(grads["dense_out_in"].T, params["dense_out_in"].T, 0.05).T,
        "dense_in_out": np_agc_leaf(grads["dense_in_out"], params["dense_in_out"], 0.05),
        "matrix_as_one_unit": np_agc_leaf(
            grads["matrix_as_one_unit"].reshape(-1), params["matrix_as_one_unit"].reshape(-1), 0.05
        ).reshape(4, 6),
    }
    for out in (from_tree, from_fn):
        for key, value in expected.items():
            np.testing.assert_allclose(np.asarray(out[key]), value, rtol=2e-5, err_msg=key)


def test_unitwise_norm_layouts():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(
        np.asarray(agc.unitwise_norm(x)),
        np.sqrt((x.astype(np.float64) ** 2).sum((0, 1), keepdims=True)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(agc.unitwise_norm(x, 1)),
        np.sqrt((x.astype(np.float64) ** 2).sum((0, 2), keepdims=True)),
        rtol=1e-6,
    )
    gain_pytorch = np.full((5, 1, 1, 1), 2.0, np.float32)
    assert agc.unitwise_norm(gain_pytorch, 0).shape == (1, 1, 1, 1)
    np.testing.assert_allclose(
        float(agc.unitwise_norm(gain_pytorch, 0).squeeze()), np.sqrt(20.0), rtol=1e-6
    )
    assert agc.unitwise_norm(jnp.ones((), jnp.bfloat16)).dtype == jnp.float32


# ----------------------------------------------------------------------------- masks


def fake_nfnet_params(prefix="NFNet"):
    leaf = lambda *s: np.ones(s, np.float32)
    return {
        f"{prefix}/~/stem_conv0": {"w": leaf(3, 3, 3, 4), "gain": leaf(4), "bias": leaf(4)},
        f"{prefix}/~/nf_block": {"skip_gain": leaf()},
        f"{prefix}/~/nf_block/~/squeeze_excite/~/linear": {"w": leaf(4, 2), "b": leaf(2)},
        f"{prefix}/~/nf_block/~/squeeze_excite/~/linear_1": {"w": leaf(2, 4), "b": leaf(4)},
        f"{prefix}/~/linear": {"w": leaf(4, 10), "b": leaf(10)},
    }


@pytest.mark.parametrize("prefix", ["NFNet", "NF_ResNet", "outer/~/NFNet"])
def test_nfnet_mask_excludes_only_the_classifier_weight(prefix):
    params = fake_nfnet_params(prefix)
    mask = registry.agc_mask(params)
    unclipped = [
        p
        for p, m in zip(treepaths.param_paths(params), jax.tree.leaves(mask), strict=True)
        if not m
    ]
    assert unclipped == [f"{prefix}/~/linear/w"]


def test_nfnet_mask_on_real_f0_tree():
    shapes = f0_shapes()
    mask = registry.agc_mask(shapes)
    paths = treepaths.param_paths(shapes)
    flags = dict(zip(paths, jax.tree.leaves(mask), strict=True))
    assert [p for p, m in flags.items() if not m] == [CLASSIFIER_W]
    assert flags["NFNet/~/linear/b"]
    se = [p for p in paths if "squeeze_excite" in p]
    assert len(se) == 4 * 12 and all(flags[p] for p in se)


def test_pattern_masks_regex_and_glob():
    params = fake_nfnet_params()
    by_regex = treepaths.mask_from_patterns(params, exclude=[r".*/b", r".*/bias"])
    by_glob = treepaths.mask_from_patterns(params, exclude=["*/b", "*/bias"], syntax="glob")
    assert by_regex == by_glob
    assert by_regex["NFNet/~/stem_conv0"] == {"w": True, "gain": True, "bias": False}
    only_se = treepaths.mask_from_patterns(params, include="*squeeze_excite*", syntax="glob")
    assert [
        p for p, m in zip(treepaths.param_paths(params), jax.tree.leaves(only_se), strict=True) if m
    ] == [p for p in treepaths.param_paths(params) if "squeeze_excite" in p]
    # Generic pytrees: lists, tuples and nested dicts get index / key paths.
    tree = {"params": [{"kernel": 1.0}, ({"kernel": 2.0, "bias": 3.0},)]}
    assert treepaths.param_paths(tree) == [
        "params/0/kernel",
        "params/1/0/bias",
        "params/1/0/kernel",
    ]
    assert treepaths.mask_from_patterns(tree, exclude="params/1/0/kernel") == {
        "params": [{"kernel": True}, ({"kernel": False, "bias": True},)]
    }


def test_pattern_that_matches_nothing_lists_available_paths():
    params = fake_nfnet_params()
    with pytest.raises(ValueError, match=r"matched no parameter") as info:
        treepaths.mask_from_patterns(params, exclude=["NFNet/~/head/w"])
    assert "NFNet/~/linear/w" in str(info.value)
    assert "NFNet/~/nf_block/skip_gain" in str(info.value)
    tx = agc.adaptive_grad_clip(0.01, mask=treepaths.exclude_paths("NFNet/linear/w"))
    with pytest.raises(ValueError, match=r"\['NFNet/linear/w'\].*matched no parameter"):
        tx.init(params)
    with pytest.raises(ValueError, match="matched no parameter"):
        registry.agc_mask({"MyNet/~/linear": {"w": np.ones(2)}})


def test_mask_prefix_and_callable():
    rng = np.random.default_rng(3)
    params = {
        "body": {"w": rng.standard_normal((4, 4)).astype(np.float32)},
        "head": {"w": rng.standard_normal((4, 2)).astype(np.float32), "b": np.zeros(2, np.float32)},
    }
    grads = jax.tree.map(lambda x: np.full_like(x, 10.0), params)
    for mask in ({"body": True, "head": False}, lambda p: {"body": True, "head": False}):
        out, _ = clip(grads, params, 0.01, mask=mask)
        np.testing.assert_array_equal(np.asarray(out["head"]["w"]), 10.0)
        np.testing.assert_array_equal(np.asarray(out["head"]["b"]), 10.0)
        assert np.all(np.asarray(out["body"]["w"]) < 10.0)


def test_none_gradients_pass_through():
    params = {"a": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    grads = {"a": np.full((2, 3), 5.0, np.float32), "b": None}
    out, state = clip(grads, params, 0.01)
    assert out["b"] is None
    assert np.all(np.asarray(out["a"]) < 5.0)
    assert int(state.num_clipped) == 3


# ----------------------------------------------------------------------------- statistics


def test_clipped_fraction_readable_from_any_chain():
    params = {"a": np.ones((4, 4), np.float32), "b": np.ones((4, 4), np.float32)}
    grads = {
        "a": np.full((4, 4), 1.0, np.float32),
        "b": np.tile(np.array([1.0, 1e-5, 1e-5, 1e-5], np.float32), (4, 1)),
    }
    # a: 4 of 4 units clipped; b: 1 of 4.
    expected_fraction = 5 / 8
    chains = {
        "chain": optax.chain(agc.adaptive_grad_clip(0.01), optax.sgd(0.1, momentum=0.9)),
        "masked": optax.masked(agc.adaptive_grad_clip(0.01), {"a": True, "b": True}),
        "inject": optax.chain(
            optax.inject_hyperparams(agc.adaptive_grad_clip, static_args=("unit_axis",))(
                clipping=0.01
            ),
            optax.scale(-1.0),
        ),
        "multi": optax.multi_transform(
            {"clip": agc.adaptive_grad_clip(0.01), "sgd": optax.sgd(0.1)},
            {"a": "clip", "b": "clip"},
        ),
    }
    for name, tx in chains.items():
        state = tx.init(params)
        assert float(agc.clipped_fraction(state)) == 0.0, name
        _, state = jax.jit(tx.update)(grads, state, params)
        np.testing.assert_allclose(
            float(agc.clipped_fraction(state)), expected_fraction, err_msg=name
        )
    # Inside optax.masked with a partial mask, only the selected leaves are counted.
    partial = optax.masked(agc.adaptive_grad_clip(0.01), {"a": False, "b": True})
    _, state = partial.update(grads, partial.init(params), params)
    np.testing.assert_allclose(float(agc.clipped_fraction(state)), 1 / 4)
    with pytest.raises(ValueError, match="No adaptive_grad_clip state"):
        agc.clipped_fraction(optax.sgd(0.1).init(params))
    two = optax.chain(agc.adaptive_grad_clip(0.01), agc.adaptive_grad_clip(0.02))
    with pytest.raises(ValueError, match="Found 2 adaptive_grad_clip states"):
        agc.clipped_fraction(two.init(params))


def test_per_param_clipped_fraction():
    params = {
        "a": np.ones((4, 4), np.float32),
        "b": np.ones((4, 4), np.float32),
        "skip": np.ones((4,), np.float32),
    }
    grads = {
        "a": np.full((4, 4), 1.0, np.float32),
        "b": np.tile(np.array([1.0, 1e-5, 1e-5, 1e-5], np.float32), (4, 1)),
        "skip": np.full((4,), 1.0, np.float32),
    }
    tx = agc.adaptive_grad_clip(
        0.01, mask={"a": True, "b": True, "skip": False}, track_per_param=True
    )
    _, state = tx.update(grads, tx.init(params), params)
    per_param = agc.per_param_clipped_fraction(state)
    assert set(per_param) == {"a", "b"}
    assert float(per_param["a"]) == 1.0 and float(per_param["b"]) == 0.25
    assert float(agc.clipped_fraction(state)) == 5 / 8
    untracked = agc.adaptive_grad_clip(0.01)
    with pytest.raises(ValueError, match="track_per_param=True"):
        agc.per_param_clipped_fraction(untracked.init(params))


# ----------------------------------------------------------------------------- errors


def test_missing_params_error():
    tx = agc.adaptive_grad_clip(0.01)
    params = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="needs the current parameters"):
        chain = optax.chain(tx, optax.sgd(0.1))
        chain.update(params, chain.init(params), None)


def test_mismatched_structure_errors():
    tx = agc.adaptive_grad_clip(0.01)
    params = {"conv": {"w": np.ones((2, 2), np.float32)}, "linear": {"w": np.ones(2, np.float32)}}
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"different tree structures: only in params: \['linear/w'\]"
    ):
        tx.update({"conv": {"w": np.ones((2, 2), np.float32)}}, state, params)
    with pytest.raises(ValueError, match=r"only in updates: \['conv/b'\]"):
        tx.update(
            {
                "conv": {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)},
                "linear": {"w": np.ones(2, np.float32)},
            },
            state,
            params,
        )
    with pytest.raises(ValueError, match=r"update for 'linear/w' has shape \(3,\)"):
        tx.update(
            {"conv": {"w": np.ones((2, 2), np.float32)}, "linear": {"w": np.ones(3, np.float32)}},
            state,
            params,
        )
    bad_mask = agc.adaptive_grad_clip(0.01, mask={"conv": True})
    with pytest.raises(ValueError, match="mask tree does not match the params tree"):
        bad_mask.init(params)
    bad_axis = agc.adaptive_grad_clip(0.01, unit_axis=2)
    with pytest.raises(ValueError, match=r"unit axis 2 is invalid for the leaf 'conv/w'"):
        bad_axis.update(params, bad_axis.init(params), params)
    with pytest.raises(ValueError, match="clipping must be > 0"):
        agc.adaptive_grad_clip(0.0)


def test_traced_mask_error():
    params = {"w": jnp.ones((2, 2))}
    tx = agc.adaptive_grad_clip(0.01, mask=lambda p: {"w": jnp.sum(p["w"]) > 0})
    with pytest.raises(ValueError, match="mask entry for 'w' is a traced value"):
        jax.jit(tx.update)(
            params, agc.AdaptiveGradClipState(jnp.zeros([]), jnp.zeros([], jnp.int32), {}), params
        )
