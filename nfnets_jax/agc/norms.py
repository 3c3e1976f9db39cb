"""Unit-wise norms and the clipping of one leaf: the arithmetic of AGC.

Norms are overflow- and underflow-safe in float32: each unit is multiplied by the power of
two that brings its largest magnitude into [1, 2) (into [2, 4) for magnitudes of 2**127 and
above) before the sum of squares, and the norm is
divided by it afterwards. Scaling by a power of two is exact, so wherever the plain float32
sum of squares neither overflows (a unit norm above ~1.8e19) nor underflows (below ~1e-19)
the result has the plain computation's bits; elsewhere it is still the correctly scaled
norm. The cost is one more pass over each leaf (the largest magnitude per unit).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import treepaths

# Default output-unit axis: Haiku and Flax store kernels with output units last
# (conv HWIO, dense (in, out)).
DEFAULT_UNIT_AXIS = -1


def reduction_axes(
    shape: tuple[int, ...], unit_axis: Any, path: str = "", explicit: bool = False
) -> tuple[int, ...] | None:
    """Axes to reduce for the per-unit norm; None means the whole-tensor norm.

    Scalars and vectors form one unit, as in the reference release. So do leaves with one
    non-singleton dimension, such as gains stored (O, 1, 1, 1) PyTorch-style, unless the
    axis was given for this leaf (``explicit``: from a per-leaf tree or function).
    """
    if unit_axis is None or len(shape) <= 1:
        return None
    if not explicit and sum(d != 1 for d in shape) <= 1:
        return None
    ndim = len(shape)
    if isinstance(unit_axis, jax.Array):
        raise ValueError(
            f"adaptive_grad_clip: the unit axis for {path!r} is a JAX array; unit axes must "
            f"be static Python ints ({treepaths.INJECT_HYPERPARAMS_HINT})"
        )
    if (
        isinstance(unit_axis, bool)
        or not isinstance(unit_axis, (int, np.integer))
        or not -ndim <= unit_axis < ndim
    ):
        raise ValueError(
            f"adaptive_grad_clip: unit axis {unit_axis!r} is invalid for the leaf {path!r} "
            f"of shape {shape}; give an int in [{-ndim}, {ndim - 1}] or None for the "
            "whole-tensor norm"
        )
    unit_axis = int(unit_axis) % ndim
    return tuple(i for i in range(ndim) if i != unit_axis)


def _power_of_two_scale(peak: jax.Array) -> jax.Array:
    """Per unit, 2**(127 - E) for the float32 biased exponent E of ``peak`` (clamped to
    normal numbers): ``peak * scale`` is in [1, 4), and 2**-126 for inf / NaN."""
    exponent = (jax.lax.bitcast_convert_type(peak, jnp.int32) >> 23) & 0xFF
    field = jnp.clip(254 - exponent, 1, 254)  # A normal float32's biased exponent.
    return jax.lax.bitcast_convert_type(field << 23, jnp.float32)


def scaled_norms(
    leaves: list[jax.Array], axes: list[tuple[int, ...] | None], overflow_safe: bool = True
) -> list[tuple[jax.Array, Any]]:
    """Per float32 leaf, (n, s) with the unit norms = n / s: n is the norm of x * s.

    ``s`` is a power of two per unit; ``n`` lies in [1, 4 * sqrt(unit size)] for a
    non-zero finite unit, is 0 for a zero unit and not finite for a non-finite one. With
    ``overflow_safe=False``: the plain float32 norm (one pass) and s = 1.0.
    """
    if not overflow_safe:
        return [
            (jnp.sqrt(jnp.sum(x * x, axis=a, keepdims=True)), 1.0)
            for x, a in zip(leaves, axes, strict=True)
        ]
    out = []
    for x, a in zip(leaves, axes, strict=True):
        scale = _power_of_two_scale(jnp.max(jnp.abs(x), axis=a, keepdims=True))
        scaled = x * scale
        out.append((jnp.sqrt(jnp.sum(scaled * scaled, axis=a, keepdims=True)), scale))
    return out


def unitwise_norm(
    x: jax.Array, unit_axis: int | None = DEFAULT_UNIT_AXIS, overflow_safe: bool = True
) -> jax.Array:
    """Float32 L2 norm of each output unit of ``x``, broadcastable against ``x``.

    Exact and overflow-safe (see the module docstring): a norm is inf only when it exceeds
    the largest float32.

    Args:
      x: A parameter or gradient leaf.
      unit_axis: The output-unit axis (kept); all other axes are reduced. The default -1 suits
        Haiku / Flax kernels (conv HWIO, dense (in, out)); use 0 for OIHW / (out, in)
        layouts. ``None``, and any leaf with at most one non-singleton dimension (scalars,
        biases, gains), give the whole-tensor norm.
      overflow_safe: scale each unit by a power of two first (exact; see the module
        docstring); False: the plain float32 computation, which overflows to inf above
        ~1.8e19 and underflows below ~1e-19.

    Returns:
      Float32 array with ``x.ndim`` dimensions, size 1 along the reduced axes.
    """
    x = jnp.asarray(x)
    axes = reduction_axes(x.shape, unit_axis)
    [(norm, scale)] = scaled_norms([x.astype(jnp.float32)], [axes], overflow_safe)
    return norm / scale


def clip_leaf(
    g: jax.Array,
    g_norm: tuple[jax.Array, Any],
    w_norm: tuple[jax.Array, Any],
    clipping: Any,
    eps: Any,
) -> tuple[jax.Array, jax.Array]:
    """Clips one leaf; returns (clipped gradient, per-unit bool "was rescaled").

    ``g_norm`` and ``w_norm`` are the (n, s) pairs of `scaled_norms` for the gradient and the
    weight. The rule, exactly: a unit with ``||G_i|| > clipping * max(||W_i||, eps)`` becomes
    ``G_i * clipping * max(||W_i||, eps) / ||G_i||``; units under the bound and units whose
    gradient or weight norm is not finite keep their bits.
    """
    g_n, g_s = g_norm  # ||G_i|| = g_n / g_s
    max_norm = clipping * jnp.maximum(w_norm[0] / w_norm[1], eps)
    # ||G_i|| > max_norm, compared in G's scaled range (exactly the plain comparison where
    # g_s = 1); non-finite norms never trigger.
    trigger = (g_n > max_norm * g_s) & jnp.isfinite(g_n) & jnp.isfinite(max_norm)
    # G_i * max_norm / ||G_i|| = (G_i * g_s) * (max_norm / g_n): the plain formula's bits
    # where g_s = 1, and in range where it is not.
    ratio = max_norm / jnp.where(trigger, g_n, 1.0)
    g32 = g.astype(jnp.float32)
    clipped = ((g32 if isinstance(g_s, float) else g32 * g_s) * ratio).astype(g.dtype)
    return jnp.where(trigger, clipped, g), trigger
