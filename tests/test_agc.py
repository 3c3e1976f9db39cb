"""Tests for nfnets_jax.agc: the rule against an independent NumPy version, numerics, dtypes,
jit/pmap. Options (masks, layouts, statistics, errors, wrappers) are in test_agc_options.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from agc_reference import CLASSIFIER_W, clip, f0_shapes, np_agc_leaf, np_unit_norms
from hypothesis import given, settings
from hypothesis import strategies as st

from nfnets_jax import agc, treepaths
from nfnets_jax.models import registry

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- helpers


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


# ----------------------------------------------------------------------------- edges of the rule

DTYPES = {"float32": (jnp.float32, 1e-5, 30), "bfloat16": (jnp.bfloat16, 1e-2, 30)}
DTYPES["float16"] = (jnp.float16, 2e-3, 3)  # float16 spans ~6e-8 .. 65504


@st.composite
def random_trees(draw):
    """1-4 leaves of one dtype, magnitudes 10^-m .. 10^m (m = 30, float16: 3), some zero."""
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    dtype, tol, max_exp = DTYPES[dtype_name]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    leaves = []
    for _ in range(draw(st.integers(1, 4))):
        shape = draw(SHAPES)
        w = rng.standard_normal(shape) * 10.0 ** draw(st.floats(-max_exp, max_exp))
        g = rng.standard_normal(shape) * 10.0 ** draw(st.floats(-max_exp, max_exp))
        if len(shape) >= 2:  # Spread the units over four decades.
            g = g * 10.0 ** rng.uniform(-2, 2, size=shape[-1])
        if draw(st.integers(0, 4)) == 0:
            w = np.zeros(shape)
        leaves.append((g, w))
    clipping = 10.0 ** draw(st.floats(-4, 0))
    eps = draw(st.sampled_from([1e-3, 1e-6, 1e-12]))
    return dtype_name, leaves, clipping, eps


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=random_trees())
def test_rule_exact_over_dtypes_and_magnitudes_against_float64_numpy(case):
    dtype_name, leaves, clipping, eps = case
    dtype, tol, _ = DTYPES[dtype_name]
    grads = [jnp.asarray(g, dtype) for g, _ in leaves]
    params = [jnp.asarray(w, dtype) for _, w in leaves]
    out, _ = clip(grads, params, clipping, eps=eps)
    for g, w, o in zip(grads, params, out, strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert o.dtype == g.dtype
        o64 = np.asarray(o, np.float64)
        assert np.all(np.isfinite(o64)), dtype_name
        bound = clipping * np.maximum(np_unit_norms(w64), eps)
        ratio = np_unit_norms(g64) / bound
        clear = np.broadcast_to(np.abs(ratio - 1) > 1e-4, g.shape)  # not at the boundary
        over = np.broadcast_to(ratio > 1, g.shape)
        # Units under the bound keep their bits; units over it follow the exact rule.
        np.testing.assert_array_equal(o64[clear & ~over], g64[clear & ~over])
        expected = np_agc_leaf(g64, w64, clipping, eps)
        unit_bound = np.broadcast_to(bound, g.shape)
        sel = clear & over
        # The output dtype's resolution: its relative precision, and its subnormal spacing
        # (a float16 bound of 1e-6 is only representable to ~6e-8).
        spacing = float(jnp.finfo(dtype).smallest_subnormal)
        atol = max(float(tol * np.max(unit_bound, initial=0)), spacing)
        np.testing.assert_allclose(o64[sel], expected[sel], rtol=tol, atol=atol)
        new_norm = np.broadcast_to(np_unit_norms(o64), g.shape)
        np.testing.assert_allclose(
            new_norm[sel], unit_bound[sel], rtol=2 * tol, atol=spacing * np.sqrt(g.size)
        )


def test_exact_when_clipping_times_eps_is_below_the_old_division_guard():
    # clipping * eps = 1e-7: the unit norm must become 1e-7 (a max(||G||, 1e-6) guard gave
    # 5e-8 here).
    w = {"w": jnp.zeros((4, 3))}
    g = {"w": jnp.full((4, 3), 2.5e-7 / 2.0)}  # Unit norm 2.5e-7 over 4 elements.
    out, state = clip(g, w, 1e-4)
    np.testing.assert_allclose(np_unit_norms(np.asarray(out["w"])), 1e-7, rtol=1e-6)
    assert int(state.num_clipped) == 3


def test_huge_and_tiny_finite_gradients_are_clipped_to_the_bound():
    # A unit norm above ~1.8e19 overflows a float32 sum of squares: it must still be clipped
    # to the bound (not zeroed), and a 1e-25 gradient still measured.
    w = {"big": jnp.ones((4, 3)), "tiny_w": jnp.full((4, 3), 1e-20)}
    g = {"big": jnp.full((4, 3), 1e25), "tiny_w": jnp.full((4, 3), 1e-25)}
    out, state = clip(g, w, 0.01, eps=1e-30)
    np.testing.assert_allclose(np_unit_norms(np.asarray(out["big"])), 0.02, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["big"]), 0.01, rtol=1e-6)
    # ||G_i|| = 2e-25 > 0.01 * 2e-20? No: 2e-25 < 2e-22, so the tiny gradient is kept.
    np.testing.assert_array_equal(np.asarray(out["tiny_w"]), np.asarray(g["tiny_w"]))
    out2, _ = clip({"w": jnp.full((4, 3), 1e-18)}, {"w": jnp.full((4, 3), 1e-20)}, 0.01, eps=0)
    np.testing.assert_allclose(np_unit_norms(np.asarray(out2["w"])), 2e-22, rtol=1e-6)
    assert int(state.num_clipped) == 3
    np.testing.assert_allclose(
        np.asarray(agc.unitwise_norm(jnp.full((4, 3), 1e30))), 2e30, rtol=1e-6
    )


def test_same_bits_as_the_plain_float32_formula_in_range():
    # Power-of-two scaling is exact: where the plain sum of squares neither overflows nor
    # underflows, the result has the plain formula's bits.
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) * 0.02, jnp.float32)
    g = g * jnp.asarray(10.0 ** rng.uniform(-1.5, 1.5, 32), jnp.float32)

    def plain(g, w):
        axes = (0, 1, 2)
        g_norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
        max_norm = 0.01 * jnp.maximum(jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True)), 1e-3)
        return jnp.where(g_norm > max_norm, g * (max_norm / g_norm), g)

    ours = jax.jit(lambda g, w: clip({"k": g}, {"k": w}, 0.01))(g, w)[0]["k"]
    one_pass = jax.jit(lambda g, w: clip({"k": g}, {"k": w}, 0.01, overflow_safe=False))
    expected = jax.jit(plain)(g, w)
    assert 0 < int(jnp.sum(ours != g)) < g.size  # a mix of clipped and kept units
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(one_pass(g, w)[0]["k"]), np.asarray(expected))
    # The one-pass sums overflow above ~1.8e19: that unit passes through, not zeroed.
    huge = g.at[..., 0].set(1e19)
    out = np.asarray(one_pass(huge, w)[0]["k"])
    np.testing.assert_array_equal(out[..., 0], np.float32(1e19))
    np.testing.assert_array_equal(out[..., 1:], np.asarray(expected)[..., 1:])


def test_non_finite_gradients_pass_through_and_stay_non_finite():
    w = {"k": jnp.ones((4, 3))}
    g = np.full((4, 3), 10.0, np.float32)
    g[0, 0], g[1, 1] = np.nan, np.inf
    out, state = clip({"k": jnp.asarray(g)}, w, 0.01)
    out = np.asarray(out["k"])
    # Units 0 and 1 are not finite: unchanged, so the NaN / inf reaches the update.
    np.testing.assert_array_equal(out[:, :2], g[:, :2])
    np.testing.assert_allclose(np_unit_norms(out[:, 2:]), 0.02, rtol=1e-6)
    assert int(state.num_clipped) == 1
