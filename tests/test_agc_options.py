"""Tests for nfnets_jax.agc's options: layouts, masks and path patterns, statistics, errors.
Optax wrappers, vmap / shard_map and Flax NNX: test_agc_wrappers.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from agc_reference import CLASSIFIER_W, clip, f0_shapes, np_agc_leaf

from nfnets_jax import agc, treepaths
from nfnets_jax.models import registry

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


def test_several_agc_states_combine_and_are_found_by_path():
    # Two AGC instances, one per multi_transform group, with different thresholds.
    params = {"a": np.ones((4, 4), np.float32), "b": np.ones((4, 6), np.float32)}
    grads = {"a": np.full((4, 4), 0.1, np.float32), "b": np.full((4, 6), 0.1, np.float32)}
    tx = optax.multi_transform(
        {
            "tight": agc.adaptive_grad_clip(0.01, track_per_param=True),
            "loose": agc.adaptive_grad_clip(1.0, track_per_param=True),
        },
        {"a": "tight", "b": "loose"},
    )
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    found = agc.find_states(state)
    assert len(found) == 2 and all("inner_states" in path for path in found)
    by_units = {int(s.num_units): s for s in found.values()}
    assert float(by_units[4].clipped_fraction) == 1.0  # a: all 4 units over 0.01
    assert float(by_units[6].clipped_fraction) == 0.0  # b: none over 1.0
    # The overall fraction is over all units: 4 of 10.
    assert float(agc.clipped_fraction(state)) == pytest.approx(0.4)
    assert set(agc.per_param_clipped_fraction(state)) == {"a", "b"}
    with pytest.raises(ValueError, match="Found 2 adaptive_grad_clip states.*find_states"):
        agc.find_state(state)
    assert agc.find_states(optax.sgd(0.1).init(params)) == {}


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
        jax.jit(tx.update)(params, tx.init(params), params)


# ----------------------------------------------------------------------------- patterns


def test_pattern_in_the_wrong_syntax_gets_a_clear_error():
    params = {"params": {"Dense_0": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}}}
    # A glob under the default regex syntax: not a valid regex, and the error says why.
    with pytest.raises(ValueError, match=r"'\*/kernel' is not a valid regular expression.*glob"):
        treepaths.mask_from_patterns(params, exclude="*/kernel")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        treepaths.exclude_paths("**/kernel")  # Checked when the mask function is built.
    # A dotted path would match only because '.' matches '/': refused, with the fix.
    with pytest.raises(ValueError, match=r"only because '\.' matches '/'.*'params/Dense_0/kernel'"):
        treepaths.mask_from_patterns(params, exclude="params.Dense_0.kernel")
    # '.' as "one character" within a name, and '.*' across '/', are fine.
    mask = treepaths.mask_from_patterns(params, exclude=[r"params/Dense_./kernel", r".*/bias"])
    assert mask == {"params": {"Dense_0": {"kernel": False, "bias": False}}}
    # A regex under the glob syntax that matches nothing: the error suggests the regex syntax.
    with pytest.raises(ValueError, match=r"matched no parameter\. They look like regular"):
        treepaths.mask_from_patterns(params, exclude=r".*/kernel", syntax="glob")
    assert treepaths.mask_from_patterns(params, exclude="*/kernel", syntax="glob") == {
        "params": {"Dense_0": {"kernel": False, "bias": True}}
    }


# ----------------------------------------------------------------------------- explicit axes


def test_explicit_per_leaf_unit_axis_overrides_the_one_unit_rule():
    # A (1, O) dense kernel (one input feature): by default the whole tensor is one unit;
    # an axis given for the leaf makes each output its own unit.
    w = {"k": jnp.asarray([[1.0, 10.0, 1.0]])}
    g = {"k": jnp.asarray([[0.5, 0.05, 0.001]])}
    whole, _ = clip(g, w, 0.01)
    per_unit, state = clip(g, w, 0.01, unit_axis={"k": -1})
    expected = np_agc_leaf(g["k"], w["k"], 0.01, explicit=True)
    np.testing.assert_allclose(np.asarray(per_unit["k"]), expected, rtol=1e-6)
    # Unit 1 (||W|| = 10, ||G|| = 0.05) is under its own bound of 0.1: kept, not shrunk.
    assert float(per_unit["k"][0, 1]) == np.float32(0.05) and int(state.num_clipped) == 1
    assert float(whole["k"][0, 1]) < 0.011  # One unit: shrunk 5x with the others.
    # The same through a function; vectors stay one unit whatever the axis.
    fn_out, _ = clip(g, w, 0.01, unit_axis=lambda p: jax.tree.map(lambda _: -1, p))
    np.testing.assert_array_equal(np.asarray(fn_out["k"]), np.asarray(per_unit["k"]))
    vec, vec_state = clip({"b": jnp.ones(3)}, {"b": jnp.ones(3)}, 0.01, unit_axis={"b": 0})
    assert int(vec_state.num_units) == 1
