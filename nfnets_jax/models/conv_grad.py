"""Convolution and weight-standardisation gradients as matrix products (for XLA:CPU).

The forward passes here are exactly the ones in `layers` (same operations, same padding);
only the backward passes differ, and only in how they are computed:

- `conv2d_same`: NHWC x HWIO convolution with TF-style SAME padding. 1x1 stride-1 kernels
  (`conv1x1`) get both gradients as plain matrix products instead of the convolution
  XLA:CPU derives by autodiff for the weight gradient (a convolution whose window is the
  whole feature map, with both operands transposed into a (C, H, W, N) layout; 2x slower
  for F0's 1x1 layers). Larger kernels keep XLA's gradients: K shifted-copy products were
  faster in isolation for some layers but 4% slower in F0's whole training step.
- `standardize_weight`: scaled weight standardisation with a hand-written backward pass: two
  per-unit sums over the fan-in (of g and of g * w) and one elementwise pass, instead of
  the chain of reductions and broadcasts that autodiff emits.

Measured side by side on F0 (docs/performance.md). Limitations: these are `jax.custom_vjp`
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
    return (
        same_padding(x_shape[1], w_shape[0], stride),
        same_padding(x_shape[2], w_shape[1], stride),
    )


def _dot32(a, b, dimension_numbers):
    """float32 `dot_general` (XLA:CPU has no bfloat16 x bfloat16 -> float32 dot)."""
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dimension_numbers)


def _conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DIMS)


def conv2d_same(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """`lax.conv_general_dilated(x, w, (stride, stride), "SAME")` on NHWC / HWIO, one group.

    1x1 stride-1 kernels take `conv1x1` (matrix-product gradients); every other kernel is
    the plain convolution with XLA's own gradients, which measured faster inside F0's
    training step than K shifted-copy products.
    """
    if w.shape[:2] == (1, 1) and stride == 1:
        return conv1x1(x, w)
    return _conv(x, w, stride, _padding(x.shape, w.shape, stride))


@jax.custom_vjp
def conv1x1(x: jax.Array, w: jax.Array) -> jax.Array:
    """1x1 stride-1 NHWC x HWIO convolution whose gradients are plain matrix products."""
    return _conv(x, w, 1, ((0, 0), (0, 0)))


def _conv1x1_fwd(x, w):
    return conv1x1(x, w), (x, w)


def _conv1x1_bwd(residuals, g):
    x, w = residuals
    cin, cout = w.shape[2:]
    dx = _dot32(g, w.reshape(cin, cout), (((3,), (1,)), ((), ()))).astype(x.dtype)
    dw_t = _dot32(g, x, _CONTRACT_NHW)  # (cout, cin): the (larger) activations stay put.
    return dx, dw_t.T.reshape(w.shape).astype(w.dtype)


conv1x1.defvjp(_conv1x1_fwd, _conv1x1_bwd)


def ws_statistics(
    w: jax.Array, eps: float, eps_mode: str
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
def standardize_weight(
    w: jax.Array, gain: jax.Array, eps: float = 1e-4, eps_mode: str = "max"
) -> jax.Array:
    """Same value as `layers.standardize_weight`; closed-form backward pass (two per-unit
    sums over the fan-in and one elementwise pass)."""
    mean, _, rsqrt = ws_statistics(w, eps, eps_mode)
    scale = rsqrt * gain
    return w * scale - mean * scale


def _ws_fwd(w, gain, eps, eps_mode):
    mean, sum_sq, rsqrt = ws_statistics(w, eps, eps_mode)
    scale = rsqrt * gain
    return w * scale - mean * scale, (w, gain, mean, sum_sq, rsqrt)


def _ws_bwd(eps, eps_mode, residuals, g):
    # out = xc * r * gain, xc = w - mean(w), r = rsqrt(t), t = max(sum(xc^2), eps) ("max")
    # or sum(xc^2) + fan_in * eps ("add"). Per unit: d_gain = r * sum(g * xc);
    # dW = r * gain * (g - mean(g)) + 2 * xc * dt, dt = -gain * sum(g * xc) * r^3 / 2.
    w, gain, mean, sum_sq, rsqrt = residuals
    units = w.shape[-1]
    fan_in = w.size // units
    w2 = w.reshape(fan_in, units).astype(jnp.float32)
    g2 = g.reshape(fan_in, units).astype(jnp.float32)
    mean = mean.reshape(units).astype(jnp.float32)
    xc = w2 - mean
    # sum(g * xc) = sum(g * w) - mean * sum(g): both sums read g and w once, unmaterialised.
    sum_g = jnp.sum(g2, axis=0)
    sum_gx = jnp.sum(g2 * w2, axis=0) - mean * sum_g
    r = rsqrt.reshape(units).astype(jnp.float32)
    gain32 = gain.astype(jnp.float32)
    dt = -0.5 * gain32 * sum_gx * r**3
    if eps_mode == "max":
        dt = jnp.where(sum_sq.reshape(units) > eps, dt, 0.0)
    dw = (r * gain32) * (g2 - sum_g / fan_in) + 2.0 * xc * dt
    d_gain = (r * sum_gx).reshape(gain.shape).astype(gain.dtype)
    return dw.reshape(w.shape).astype(w.dtype), d_gain


standardize_weight.defvjp(_ws_fwd, _ws_bwd)
