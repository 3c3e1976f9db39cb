"""Convolution and weight-standardisation gradients as matrix products (for XLA:CPU).

The forward passes here are exactly the ones in `layers` (same operations, same padding);
only the backward passes differ, and only in how they are computed:

- `conv2d_same`: NHWC x HWIO convolution with TF-style SAME padding. The weight gradient is
  computed with matrix products instead of the convolution XLA:CPU derives by autodiff (a
  convolution whose window is the whole feature map, plus transposes of both operands into
  a (C, H, W, N) layout, several times slower). Stride 1, K x K: the K horizontally shifted
  copies of the padded input are concatenated along channels (K x the input's size), and
  kernel row i is G_i^T @ that, where G_i is the output gradient shifted down by i rows
  into the padded height (K products). Strided: one product with the full K*K patches.
  1x1 stride-1 convolutions get both gradients as plain matrix products.
- `standardize_weight`: scaled weight standardisation with a hand-written backward pass whose
  per-unit sums over the fan-in are matrix-vector products, instead of the column reductions
  that autodiff emits.

Measured side by side on F0 (README "Performance"). Limitations: these are `jax.custom_vjp`
functions, so forward-mode autodiff (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) through them is
unsupported; use `layers.forced_conv_grad("xla")` for that. Gradients equal autodiff's up to
float32 summation order (tests/test_conv_grad.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")
_CONTRACT_NHW = (((0, 1, 2), (0, 1, 2)), ((), ()))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/XLA "SAME" padding (low, high) of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padding(x_shape, w_shape, stride):
    return (same_padding(x_shape[1], w_shape[0], stride),
            same_padding(x_shape[2], w_shape[1], stride))


def _dot32(a, b, dimension_numbers):
    """float32 `dot_general` (XLA:CPU has no bfloat16 x bfloat16 -> float32 dot)."""
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dimension_numbers)


def _conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_same(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """`lax.conv_general_dilated(x, w, (stride, stride), "SAME")` on NHWC / HWIO, one group."""
    return _conv(x, w, stride, _padding(x.shape, w.shape, stride))


def _conv_fwd(x, w, stride):
    return conv2d_same(x, w, stride), (x, w)


def _conv_bwd(stride, residuals, g):
    x, w = residuals
    kh, kw, cin, cout = w.shape
    n, oh, ow, _ = g.shape
    if kh == kw == 1 and stride == 1:
        w2 = w.reshape(cin, cout)
        dx = _dot32(g, w2, (((3,), (1,)), ((), ()))).astype(x.dtype)
        dw_t = _dot32(g, x, _CONTRACT_NHW)
        return dx, dw_t.T.reshape(w.shape).astype(w.dtype)
    padding = _padding(x.shape, w.shape, stride)
    _, conv_vjp = jax.vjp(lambda lhs: _conv(lhs, w, stride, padding), x)
    dx, = conv_vjp(g)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    if stride == 1:
        # dW[i, j] = sum over (n, y, x) of xp[n, y + i, x + j]^T g[n, y, x]: shift the input
        # by j (columns, concatenated) and the gradient by i (rows, zero-padded).
        hp = xp.shape[1]
        shifted = jnp.concatenate([xp[:, :, j:j + ow, :] for j in range(kw)], axis=-1)
        rows = [_dot32(jnp.pad(g, ((0, 0), (i, hp - oh - i), (0, 0), (0, 0))), shifted,
                       _CONTRACT_NHW) for i in range(kh)]  # Each (cout, kw * cin).
        dw = jnp.stack(rows).reshape(kh, cout, kw, cin).transpose(0, 2, 3, 1)
        return dx, dw.astype(w.dtype)
    taps = [lax.slice(xp, (0, i, j, 0),
                      (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, cin),
                      (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    # G^T @ patches keeps the larger operand (patches) in its natural layout.
    dw_t = _dot32(g, patches, _CONTRACT_NHW)
    return dx, dw_t.T.reshape(w.shape).astype(w.dtype)


conv2d_same.defvjp(_conv_fwd, _conv_bwd)


def ws_statistics(w: jax.Array, eps: float, eps_mode: str
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-unit (mean, fan_in * var, rsqrt of the epsilon-guarded fan_in * var) of HWIO `w`.

    Weight standardisation is then (w - mean) * rsqrt * gain, computed as
    `w * scale - mean * scale`; `layers.standardize_weight` and `standardize_weight` here
    share these statistics.
    """
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    if eps_mode == "max":
        rsqrt = lax.rsqrt(jnp.maximum(var * fan_in, eps))
    elif eps_mode == "add":
        rsqrt = lax.rsqrt((var + eps) * fan_in)
    else:
        raise ValueError(f"eps_mode must be 'max' or 'add', got {eps_mode!r}.")
    return mean, var * fan_in, rsqrt


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4,
                       eps_mode: str = "max") -> jax.Array:
    """Same value as `layers.standardize_weight`; backward pass with matrix-vector sums."""
    mean, _, rsqrt = ws_statistics(w, eps, eps_mode)
    scale = rsqrt * gain
    return w * scale - mean * scale


def _ws_fwd(w, gain, eps, eps_mode):
    mean, sum_sq, rsqrt = ws_statistics(w, eps, eps_mode)
    scale = rsqrt * gain
    return w * scale - mean * scale, (w, gain, mean, sum_sq, rsqrt)


def _column_sums(a: jax.Array) -> jax.Array:
    ones = jnp.ones((1, a.shape[0]), jnp.float32)
    return _dot32(ones, a, (((1,), (0,)), ((), ())))[0]


def _ws_bwd(eps, eps_mode, residuals, g):
    # out = xc * r * gain, xc = w - mean(w), r = rsqrt(t), t = max(sum(xc^2), eps) ("max")
    # or sum(xc^2) + fan_in * eps ("add"). Per unit: d_gain = r * sum(g * xc);
    # dW = r * gain * (g - mean(g)) + 2 * xc * dt, dt = -gain * sum(g * xc) * r^3 / 2.
    w, gain, mean, sum_sq, rsqrt = residuals
    units = w.shape[-1]
    fan_in = w.size // units
    w2 = w.reshape(fan_in, units).astype(jnp.float32)
    g2 = g.reshape(fan_in, units).astype(jnp.float32)
    xc = w2 - mean.reshape(1, units)
    sums = _column_sums(jnp.concatenate([g2, g2 * xc], axis=1))
    sum_g, sum_gx = sums[:units], sums[units:]
    r = rsqrt.reshape(units).astype(jnp.float32)
    gain32 = gain.astype(jnp.float32)
    dt = -0.5 * gain32 * sum_gx * r ** 3
    if eps_mode == "max":
        dt = jnp.where(sum_sq.reshape(units) > eps, dt, 0.0)
    dw = (r * gain32) * (g2 - sum_g / fan_in) + 2.0 * xc * dt
    d_gain = (r * sum_gx).reshape(gain.shape).astype(gain.dtype)
    return dw.reshape(w.shape).astype(w.dtype), d_gain


standardize_weight.defvjp(_ws_fwd, _ws_bwd)
