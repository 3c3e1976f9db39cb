"""The matrix-product backward passes (`conv_grad`) against autodiff of the plain ops."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import conv_grad, layers, nfnet, nfresnet


def _max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


@pytest.mark.parametrize(
    "size,kernel,stride",
    [
        (9, 3, 1),
        (9, 3, 2),
        (8, 3, 2),
        (8, 1, 1),
        (8, 1, 2),
        (11, 7, 2),
        (6, 2, 2),
        (5, 3, 1),
        (7, 2, 1),
        (6, 7, 1),
    ],
)
def test_conv2d_same_value_and_gradients_match_xla(size, kernel, stride):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(size * kernel + stride), 3)
    x = jax.random.normal(kx, (2, size, size + 1, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 7))
    ref = lambda a, b: jax.lax.conv_general_dilated(
        a, b, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    new = lambda a, b: conv_grad.conv2d_same(a, b, stride)
    y = jax.jit(new)(x, w)
    np.testing.assert_array_equal(y, jax.jit(ref)(x, w))  # Same op, same padding: same bits.
    cot = jax.random.normal(kg, y.shape)
    # Jitted (one compilation each; eagerly every primitive compiles on its own).
    pullback = lambda f: jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))(x, w, cot)
    for expected, got in zip(pullback(ref), pullback(new)):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert _max_rel(expected, got) < 1e-5


@pytest.mark.parametrize("kernel", [1, 3])
def test_bfloat16_gradients_compile_and_keep_dtypes(kernel):
    # Jitted, as in training (XLA:CPU has no bfloat16 x bfloat16 -> float32 dot thunk).
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 4, 6), jnp.bfloat16)
    gain = jnp.ones((6,), jnp.bfloat16)

    def loss(a, b, c, conv=conv_grad.conv2d_same, ws=conv_grad.standardize_weight):
        return jnp.sum(conv(a, ws(b, c), 1).astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(x, w, gain)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    xla_conv = lambda a, b, s: jax.lax.conv_general_dilated(
        a, b, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ref = jax.grad(lambda a, b, c: loss(a, b, c, xla_conv, layers.standardize_weight), (0, 1, 2))(
        x.astype(jnp.float32), w.astype(jnp.float32), gain.astype(jnp.float32)
    )
    for expected, got in zip(ref, grads):
        assert _max_rel(expected, got.astype(jnp.float32)) < 5e-2


@pytest.mark.parametrize("eps_mode,eps", [("max", 1e-4), ("add", 1e-5)])
@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (1, 1, 16, 5)])
def test_standardize_weight_value_and_gradients_match_autodiff(eps_mode, eps, shape):
    kw, kg, kc = jax.random.split(jax.random.PRNGKey(len(shape) + shape[0]), 3)
    w = jax.random.normal(kw, shape) * 0.3 + 0.1
    gain = 1.0 + 0.5 * jax.random.normal(kg, (shape[-1],))
    cot = jax.random.normal(kc, shape)
    ref = lambda a, b: layers.standardize_weight(a, b, eps, eps_mode)
    new = lambda a, b: conv_grad.standardize_weight(a, b, eps, eps_mode)
    np.testing.assert_array_equal(new(w, gain), ref(w, gain))
    expected = jax.vjp(ref, w, gain)[1](cot)
    got = jax.vjp(new, w, gain)[1](cot)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert _max_rel(e, g) < 1e-5


def test_standardize_weight_gradient_accurate_when_the_mean_dominates():
    # The backward pass takes sum(g * (w - mean)) as sum(g * w) - mean * sum(g); with
    # mean / std = 100 it must still match autodiff to float32 rounding.
    rng = np.random.default_rng(0)
    w = (1.0 + 0.01 * rng.standard_normal((3, 3, 128, 16))).astype(np.float32)
    gain = np.linspace(0.5, 2.0, 16).astype(np.float32)
    cot = rng.standard_normal(w.shape).astype(np.float32)
    expected = jax.vjp(lambda a, b: layers.standardize_weight(a, b), w, gain)[1](cot)
    got = jax.vjp(lambda a, b: conv_grad.standardize_weight(a, b), w, gain)[1](cot)
    for e, g in zip(expected, got):
        assert _max_rel(e, g) < 1e-5


def test_standardize_weight_gradient_where_eps_clamps():
    # A constant unit has zero variance: the "max" epsilon clamps it, and no gradient flows
    # through its (then constant) scale. The other units are unaffected.
    w = jnp.stack([jnp.full((3, 3, 2), 0.7), jnp.linspace(-1, 1, 18).reshape(3, 3, 2)], -1)
    gain = jnp.array([1.5, 0.5])
    cot = jax.random.normal(jax.random.PRNGKey(3), w.shape)
    expected = jax.vjp(lambda a, b: layers.standardize_weight(a, b), w, gain)[1](cot)
    got = jax.vjp(lambda a, b: conv_grad.standardize_weight(a, b), w, gain)[1](cot)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def _tiny_nfnet_grads(impl, group_conv):
    def forward(x):
        net = nfnet.NFNet(
            num_classes=5,
            variant="F0",
            widths=[16, 32, 32, 32],
            depths=[1, 1, 1, 1],
            group_width=8,
            group_conv=group_conv,
            conv_grad=impl,
            drop_rate=0.0,
            stochdepth_rate=0.0,
        )
        return net(x, is_training=True)["logits"]

    fwd = hk.transform(forward)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = jax.jit(fwd.init)(jax.random.PRNGKey(1), x)
    # Non-zero skip gains, so every conv gets a gradient.
    params = jax.tree.map(lambda p: p + 0.3 if p.ndim == 0 else p, params)
    apply = lambda p: fwd.apply(p, None, x)
    # Jitted: one compilation per program (eagerly, every primitive compiles on its own).
    return jax.jit(apply)(params), jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(params)


@pytest.mark.parametrize("group_conv", ["native", "split", "dense"])
@pytest.mark.parametrize("groups, kernel, stride", [(3, 3, 1), (3, 3, 2), (1, 1, 2)])
def test_ws_conv_gradients_match_across_conv_grad_impls(group_conv, groups, kernel, stride):
    # Every grouped-convolution strategy routes its convolutions through conv_grad's
    # matrix products under "matmul" (ungrouped ones) or keeps XLA's (native grouped ones).
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 6))
    conv = lambda impl: hk.transform(
        lambda a: layers.WSConv2D(
            12, kernel, stride, groups, group_conv=group_conv, conv_grad=impl
        )(a)
    )
    params = jax.jit(conv("xla").init)(jax.random.PRNGKey(1), x)
    results = {}
    for impl in ("xla", "matmul"):
        fn = conv(impl)
        loss = lambda p, a, f=fn: jnp.sum(jnp.sin(f.apply(p, None, a)))
        results[impl] = (
            jax.jit(fn.apply)(params, None, x),
            jax.jit(jax.grad(loss, (0, 1)))(params, x),
        )
    np.testing.assert_array_equal(results["matmul"][0], results["xla"][0])
    for expected, got in zip(
        jax.tree.leaves(results["xla"][1]), jax.tree.leaves(results["matmul"][1])
    ):
        assert _max_rel(expected, got) < 1e-5


def test_nfnet_gradients_identical_across_conv_grad_impls():
    # The CPU default strategy ("split") through a whole network; the other strategies are
    # covered layer by layer above.
    logits_xla, grads_xla = _tiny_nfnet_grads("xla", "split")
    logits_mm, grads_mm = _tiny_nfnet_grads("matmul", "split")
    np.testing.assert_array_equal(logits_mm, logits_xla)
    flat_xla, flat_mm = jax.tree.leaves_with_path(grads_xla), jax.tree.leaves(grads_mm)
    assert len(flat_xla) == len(flat_mm)
    nonzero = 0
    for (path, expected), got in zip(flat_xla, flat_mm):
        scale = float(jnp.max(jnp.abs(expected)))
        nonzero += scale > 0
        np.testing.assert_allclose(
            got,
            expected,
            rtol=2e-4,
            atol=2e-5 * max(scale, 1e-6),
            err_msg=jax.tree_util.keystr(path),
        )
    assert nonzero > 0.9 * len(flat_xla)


def test_nfresnet_accepts_conv_grad_and_matches():
    def grads(impl):
        fwd = hk.transform(
            lambda x: nfresnet.NFResNet(
                num_classes=3,
                variant="ResNet26",
                width=1,
                depths=[1, 1, 1, 1],
                conv_grad=impl,
                stochdepth_rate=0.0,
            )(x, is_training=True)["logits"]
        )
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
        params = jax.jit(fwd.init)(jax.random.PRNGKey(1), x)
        return jax.jit(jax.grad(lambda p: jnp.sum(fwd.apply(p, None, x) ** 2)))(params)

    for e, g in zip(jax.tree.leaves(grads("xla")), jax.tree.leaves(grads("matmul"))):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6 + 2e-5 * float(jnp.abs(e).max()))


def test_conv_grad_resolution_and_errors():
    assert layers.default_conv_grad("cpu") == "matmul"
    assert layers.default_conv_grad("gpu") == layers.default_conv_grad("tpu") == "xla"
    assert layers.resolve_conv_grad("auto") == layers.default_conv_grad()
    with layers.forced_conv_grad("xla"):
        assert layers.resolve_conv_grad("matmul") == "xla"
    assert layers.resolve_conv_grad("matmul") == "matmul"
    with pytest.raises(ValueError, match="Unknown conv_grad implementation 'fast'.*matmul"):
        layers.resolve_conv_grad("fast")
    with pytest.raises(ValueError, match="Unknown conv_grad implementation 'cudnn'"):
        hk.transform(lambda x: nfnet.NFNet(conv_grad="cudnn")(x, False)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
        )
    with pytest.raises(ValueError, match="eps_mode"):
        conv_grad.standardize_weight(jnp.ones((1, 1, 2, 2)), jnp.ones(2), 1e-4, "sum")


def test_forward_mode_autodiff_needs_xla_impl():
    # 1x1 convolutions (and weight standardisation) are custom_vjps under "matmul".
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 6, 2))
    conv = lambda impl: hk.without_apply_rng(
        hk.transform(lambda a: layers.WSConv2D(4, 1, conv_grad=impl, name="conv")(a))
    )
    params = conv("xla").init(jax.random.PRNGKey(0), x)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda a: conv("matmul").apply(params, a), (x,), (x,))
    _, tangent = jax.jvp(lambda a: conv("xla").apply(params, a), (x,), (x,))
    assert tangent.shape == (1, 6, 6, 4)
