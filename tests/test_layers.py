"""Building blocks: weight standardisation, grouped-conv strategies, SE, stochastic depth."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import layers


def test_weight_standardisation_zero_mean_and_unit_fan_in_variance():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 8)) * 3.0 + 1.5
    w_hat = layers.standardize_weight(w, jnp.ones((8,)))
    fan_in = 3 * 3 * 16
    np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w_hat.var(axis=(0, 1, 2)), 1.0 / fan_in, rtol=1e-4)
    gain = jnp.arange(1.0, 9.0)
    np.testing.assert_allclose(
        layers.standardize_weight(w, gain), w_hat * gain, rtol=1e-5, atol=1e-6
    )


def test_weight_standardisation_epsilon_is_a_max_not_an_addition():
    w = jnp.zeros((1, 1, 4, 2)).at[0, 0, 0, 0].set(1e-3)  # fan_in * var = 7.5e-7 < 1e-4
    w_hat = layers.standardize_weight(w, jnp.ones((2,)))
    centred = w - w.mean(axis=(0, 1, 2), keepdims=True)
    np.testing.assert_allclose(w_hat, centred / jnp.sqrt(1e-4), rtol=1e-5)
    assert np.all(np.isfinite(w_hat))  # the all-zero unit stays finite (zero)
    # timm's numerics add the epsilon to the variance instead.
    timm = layers.standardize_weight(w, jnp.ones((2,)), eps=1e-5, eps_mode="add")
    var = w.var(axis=(0, 1, 2), keepdims=True)
    np.testing.assert_allclose(timm, centred / jnp.sqrt(4 * (var + 1e-5)), rtol=1e-5)


def _conv_fn(strategy, groups, kernel, stride):
    return hk.transform(
        lambda x: layers.WSConv2D(
            12, kernel, stride=stride, feature_group_count=groups, group_conv=strategy
        )(x)
    )


@pytest.mark.parametrize(
    "groups, kernel, stride", [(1, 3, 2), (3, 3, 2), (3, 3, 1), (1, 1, 1), (1, 1, 2)]
)
def test_group_conv_strategies_agree_in_outputs_and_gradients(groups, kernel, stride):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 6))
    params = _conv_fn("native", groups, kernel, stride).init(jax.random.PRNGKey(2), x)
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params
    )  # non-trivial gain and bias
    results = {}
    for strategy in layers.GROUP_CONV_STRATEGIES:
        fn = _conv_fn(strategy, groups, kernel, stride)
        assert jax.tree.map(jnp.shape, fn.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
            jnp.shape, params
        )
        loss = lambda p, x, f=fn: jnp.sum(jnp.sin(f.apply(p, None, x)))
        results[strategy] = (
            jax.jit(fn.apply)(params, None, x),
            jax.jit(jax.grad(loss, (0, 1)))(params, x),
        )
    ref_out, ref_grads = results["native"]
    assert ref_out.shape == (2, 5 if stride == 2 else 9, 5 if stride == 2 else 9, 12)
    for strategy, (out, grads) in results.items():
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5, err_msg=strategy)
        jax.tree.map(
            lambda a, b, s=strategy: np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-5, err_msg=s
            ),
            grads,
            ref_grads,
        )


def test_unknown_group_conv_strategy_and_bad_group_count():
    with pytest.raises(ValueError, match="Unknown group_conv strategy 'fast'.*native"):
        layers.resolve_group_conv("fast")
    with pytest.raises(ValueError, match="not divisible by feature_group_count=3"):
        hk.transform(lambda x: layers.WSConv2D(8, 3, feature_group_count=3)(x)).init(
            jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3))
        )
    with pytest.raises(ValueError, match="4 input channels are not divisible by 3 groups"):
        hk.transform(lambda x: layers.WSConv2D(9, 3, feature_group_count=3)(x)).init(
            jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 4))
        )
    assert layers.resolve_group_conv("auto") == layers.default_group_conv()
    with layers.forced_group_conv("dense"):
        assert layers.resolve_group_conv("split") == "dense"


def test_wsconv_parameters_and_same_padding():
    fn = hk.transform(lambda x: layers.WSConv2D(4, 3, stride=2, name="c")(x))
    x = jnp.ones((1, 5, 5, 2))
    params = fn.init(jax.random.PRNGKey(0), x)
    assert {k: v.shape for k, v in params["c"].items()} == {
        "w": (3, 3, 2, 4),
        "gain": (4,),
        "bias": (4,),
    }
    np.testing.assert_array_equal(params["c"]["gain"], 1.0)
    np.testing.assert_array_equal(params["c"]["bias"], 0.0)
    assert fn.apply(params, None, x).shape == (1, 3, 3, 4)  # ceil(5 / 2)


def test_squeeze_excite_hidden_width_and_range():
    fn = hk.transform(lambda x: layers.SqueezeExcite(10, 10, 0.5)(x))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 10))
    params = fn.init(jax.random.PRNGKey(1), x)
    assert params["squeeze_excite/~/linear"]["w"].shape == (10, 5)
    assert params["squeeze_excite/~/linear_1"]["w"].shape == (5, 10)
    gate = fn.apply(params, None, x)
    assert gate.shape == (3, 1, 1, 10)
    assert np.all((gate > 0) & (gate < 1))


def test_stochastic_depth_drops_whole_examples_at_the_rate_without_rescaling():
    x = jnp.ones((4000, 2, 2, 3)) * 2.0
    out = layers.stochastic_depth(x, 0.3, is_training=True, rng=jax.random.PRNGKey(0))
    per_example = np.asarray(out).reshape(4000, -1)
    kept = np.all(per_example == 2.0, axis=1)
    dropped = np.all(per_example == 0.0, axis=1)
    assert np.all(kept | dropped)  # whole examples, values not rescaled
    # Binomial(4000, 0.3): std 29; allow 5 sigma.
    assert abs(dropped.sum() - 1200) < 5 * 29
    np.testing.assert_array_equal(layers.stochastic_depth(x, 0.3, is_training=False), x)
    np.testing.assert_array_equal(
        layers.stochastic_depth(x, 0.0, is_training=True, rng=jax.random.PRNGKey(0)), x
    )


def test_avg_pool_same_divides_by_valid_count():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    out = hk.transform(lambda x: layers.avg_pool_same(x)).apply({}, None, x)
    # TF SAME on 3 -> 2 windows: rows/cols {0, 1} and {2} (+ padding, not counted).
    expected = np.array([[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]])
    np.testing.assert_allclose(out[0, :, :, 0], expected)
