"""NFNet family: exact parameter/module/MAC counts, the released tree, forward behaviour."""

import types

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import counting, nfnet, registry, variants

# One worker runs this module (--dist loadgroup): its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("nfnet")

# REFERENCE §1: exact parameter counts (1000 classes) and module counts.
PARAMS = {
    "F0": 71_489_284,
    "F1": 132_634_256,
    "F2": 193_779_228,
    "F3": 254_924_200,
    "F4": 316_069_172,
    "F5": 377_214_144,
    "F6": 438_359_116,
    "F7": 499_504_088,
    "F0+": 118_824_516,
    "F1+": 220_357_008,
    "F2+": 321_889_500,
    "F3+": 423_421_992,
    "F4+": 524_954_484,
    "F5+": 626_486_976,
    "F6+": 728_019_468,
    "F7+": 829_551_960,
}
MODULES = {"F0": 94, "F1": 178, "F2": 262, "F3": 346, "F4": 430, "F5": 514, "F6": 598, "F7": 682}
# REFERENCE §1: billions of MACs at each variant's test resolution.
GMACS = {
    "F0": 12.38,
    "F1": 35.54,
    "F2": 62.59,
    "F3": 114.76,
    "F4": 215.24,
    "F5": 289.76,
    "F6": 377.28,
    "F7": 478.78,
}


def _shapes(variant, res=32, **kwargs):
    f = hk.transform(lambda x: nfnet.NFNet(1000, variant, **kwargs)(x, is_training=False))
    return jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))


@pytest.mark.parametrize("variant", list(PARAMS))
def test_exact_parameter_and_module_counts(variant):
    params = _shapes(variant)
    assert counting.count_params(params) == PARAMS[variant]
    depth_multiplier = int(variant[1]) + 1  # F0 has depths 1x[1, 2, 6, 3]
    assert len(params) == MODULES[variant.rstrip("+")]  # "+" only changes widths
    assert len(params) == 10 + 7 * 12 * depth_multiplier


def test_f0_parameter_tree_is_the_released_one():
    params = _shapes("F0")
    expected = {f"NFNet/~/stem_conv{i}": {"w", "gain", "bias"} for i in range(4)}
    expected["NFNet/~/final_conv"] = {"w", "gain", "bias"}
    expected["NFNet/~/linear"] = {"w", "b"}
    for i in range(12):  # depths 1, 2, 6, 3: stages start at blocks 0, 1, 3, 9
        block = "NFNet/~/nf_block" + ("" if i == 0 else f"_{i}")
        expected[block] = {"skip_gain"}
        convs = ["conv0", "conv1", "conv1b", "conv2"] + (
            ["conv_shortcut"] if i in (0, 1, 3, 9) else []
        )
        for conv in convs:
            expected[f"{block}/~/{conv}"] = {"w", "gain", "bias"}
        for linear in ("linear", "linear_1"):
            expected[f"{block}/~/squeeze_excite/~/{linear}"] = {"w", "b"}
    assert {m: set(p) for m, p in params.items()} == expected
    # Layouts: HWIO conv kernels with I already divided by groups, (in, out) dense.
    assert params["NFNet/~/stem_conv0"]["w"].shape == (3, 3, 3, 16)
    assert params["NFNet/~/stem_conv3"]["w"].shape == (3, 3, 64, 128)
    assert params["NFNet/~/nf_block_3/~/conv1"]["w"].shape == (3, 3, 128, 768)
    assert params["NFNet/~/nf_block_3/~/squeeze_excite/~/linear"]["w"].shape == (1536, 768)
    assert params["NFNet/~/nf_block_1/~/conv_shortcut"]["w"].shape == (1, 1, 256, 512)
    assert params["NFNet/~/final_conv"]["w"].shape == (1, 1, 1536, 3072)
    assert params["NFNet/~/linear"]["w"].shape == (3072, 1000)
    assert params["NFNet/~/nf_block"]["skip_gain"].shape == ()


def test_parameters_do_not_depend_on_group_conv_strategy():
    native = jax.tree.map(jnp.shape, _shapes("F0", group_conv="native"))
    for strategy in ("split", "dense", "auto"):
        assert jax.tree.map(jnp.shape, _shapes("F0", group_conv=strategy)) == native


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(GMACS))
def test_mac_counts_match_the_paper(variant):
    res = variants.NFNET[variant].test_px
    counts = counting.model_counts(registry.build_forward("NFNet", variant=variant), res)
    assert round(counts["macs"] / 1e9, 2) == GMACS[variant]


def test_variant_table():
    assert len(variants.NFNET) == 16
    f3 = variants.NFNET["F3"]
    assert (f3.depths, f3.train_px, f3.test_px) == ((4, 8, 24, 12), 320, 416)
    assert (f3.randaug_layers, f3.randaug_magnitude, f3.drop_rate) == (4, 15, 0.4)
    assert variants.NFNET["F5+"].widths == (384, 768, 2048, 2048)
    assert variants.NFNET["F5+"].depths == variants.NFNET["F5"].depths


def test_betas_follow_expected_std_bookkeeping():
    stds = nfnet.expected_stds([1, 2, 6, 3], alpha=0.2)
    a2 = 0.04
    assert stds[:4] == pytest.approx([1.0, np.sqrt(1 + a2), np.sqrt(1 + a2), np.sqrt(1 + 2 * a2)])
    assert stds[9] == pytest.approx(np.sqrt(1 + 6 * a2))  # entering stage 4
    assert stds[10] == pytest.approx(np.sqrt(1 + a2))  # reset after the transition block


TINY = dict(widths=[32, 64, 96, 96], depths=[1, 2, 1, 1], group_width=16)


@pytest.fixture(scope="module")
def tiny():
    fn = hk.transform(lambda x, train, **kw: nfnet.NFNet(10, "F0", **TINY)(x, train, **kw))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    params = jax.jit(fn.init, static_argnums=2)(jax.random.PRNGKey(1), x, False)
    # Jitted: one compilation per output set (eagerly, every primitive compiles on its own).
    apply = jax.jit(
        fn.apply, static_argnums=3, static_argnames=("return_features", "return_metrics")
    )
    return types.SimpleNamespace(init=fn.init, apply=apply), params, x


def test_forward_outputs_and_features(tiny):
    fn, params, x = tiny
    out = fn.apply(params, None, x, False, return_features=True)
    assert out["logits"].shape == (4, 10)
    assert out["pool"].shape == (4, 192)  # final conv = 2 x last width
    assert out["stem"].shape == (4, 8, 8, 16)
    assert [out[f"stage_{i}"].shape[1:] for i in range(4)] == [
        (8, 8, 32),
        (4, 4, 64),
        (2, 2, 96),
        (1, 1, 96),
    ]
    assert np.all(np.isfinite(out["logits"]))


def test_zero_skip_gain_makes_non_transition_blocks_the_identity(tiny):
    fn, params, x = tiny
    out = fn.apply(params, None, x, False, return_features=True, return_metrics=True)
    # Block 2 is stage 2's second block: at init (skip_gain = 0) it returns its input.
    assert out["block_2/avg_var"] == out["block_1/avg_var"]
    assert out["block_2/avg_sq_mean"] == out["block_1/avg_sq_mean"]
    moved_params = dict(params)
    moved_params["NFNet/~/nf_block_2"] = {"skip_gain": jnp.asarray(0.7)}
    moved = fn.apply(moved_params, None, x, False, return_features=True, return_metrics=True)
    np.testing.assert_array_equal(out["stage_0"], moved["stage_0"])  # earlier stage untouched
    assert moved["block_2/avg_var"] != moved["block_1/avg_var"]
    assert not np.allclose(out["stage_1"], moved["stage_1"])


def test_training_mode_uses_dropout_and_stochastic_depth(tiny):
    fn, params, x = tiny
    params = {
        m: ({"skip_gain": jnp.asarray(1.0)} if set(p) == {"skip_gain"} else p)
        for m, p in params.items()
    }
    a = fn.apply(params, jax.random.PRNGKey(0), x, True)["logits"]
    b = fn.apply(params, jax.random.PRNGKey(1), x, True)["logits"]
    c = fn.apply(params, None, x, False)["logits"]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, fn.apply(params, None, x, False)["logits"])
    with pytest.raises(ValueError, match="PRNGKey"):
        fn.apply(params, None, x, True)


def test_timm_numerics_differ_slightly(tiny):
    fn, params, x = tiny
    timm = hk.transform(lambda x: nfnet.NFNet(10, "F0", numerics="timm", **TINY)(x, False))
    params = {
        m: ({"skip_gain": jnp.asarray(1.0)} if set(p) == {"skip_gain"} else p)
        for m, p in params.items()
    }
    ref = fn.apply(params, None, x, False)["pool"]
    other = jax.jit(timm.apply)(params, None, x)["pool"]
    assert not np.allclose(ref, other, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ref, other, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs, images, error, match",
    [
        (dict(variant="F9"), (1, 32, 32, 3), ValueError, "Unknown NFNet variant 'F9'.*F0, F0\\+"),
        (dict(numerics="torch"), (1, 32, 32, 3), ValueError, "Unknown numerics 'torch'"),
        (dict(group_conv="fastest"), (1, 32, 32, 3), ValueError, "Unknown group_conv"),
        (dict(drop_rate=1.5), (1, 32, 32, 3), ValueError, "drop_rate must be in"),
        (
            dict(group_width=64, widths=[32, 64, 96, 96]),
            (1, 32, 32, 3),
            ValueError,
            "smaller than group_width=64",
        ),
        ({}, (32, 32, 3), ValueError, "rank 4, got shape \\(32, 32, 3\\)"),
        ({}, (1, 3, 32, 32), ValueError, "expects 3 input channels.*got 32"),
    ],
)
def test_bad_input_errors(kwargs, images, error, match):
    fn = hk.transform(lambda x: nfnet.NFNet(10, **kwargs)(x, is_training=False))
    with pytest.raises(error, match=match):
        jax.eval_shape(fn.init, jax.random.PRNGKey(0), jnp.zeros(images))


def test_integer_images_are_rejected():
    fn = hk.transform(lambda x: nfnet.NFNet(10)(x, is_training=False))
    with pytest.raises(TypeError, match="floating-point images.*uint8"):
        jax.eval_shape(fn.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
