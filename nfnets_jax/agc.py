"""Adaptive gradient clipping (AGC) as an optax gradient transformation.

AGC (Brock et al. 2021, section 4) rescales the gradient of every output unit whose norm is
large relative to the norm of that unit's weights. For a leaf ``W`` with gradient ``G`` and
output unit ``i``::

    if ||G_i|| / max(||W_i||, eps) > clipping:
        G_i <- clipping * max(||W_i||, eps) / max(||G_i||, 1e-6) * G_i

This module holds the transformation (:func:`adaptive_grad_clip`), its state, the unit-wise
norm it uses (:func:`unitwise_norm`), and readers of the clipping statistics in any optax
optimizer state (:func:`find_state`, :func:`clipped_fraction`,
:func:`per_param_clipped_fraction`). Masks are pytrees of bools or functions of the params:
`nfnets_jax.treepaths` builds them from parameter-path patterns (``exclude_paths``,
``mask_from_patterns``), and `nfnets_jax.models.registry.agc_mask` is the reference NFNet
mask (everything but the classifier weight).

References:
  Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
  Normalization", ICML 2021, https://arxiv.org/abs/2102.06171
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import treepaths

# Floor on the weight norm, so zero-initialised parameters (skip gains, biases) can still move.
DEFAULT_EPS = 1e-3
# Guards the division by the gradient norm; distinct from `eps` and in practice never active,
# because a unit is only rescaled when its gradient norm exceeds clipping * eps > 0.
_DIV_EPS = 1e-6
# Default output-unit axis: Haiku and Flax store kernels with output units last
# (conv HWIO, dense (in, out)).
DEFAULT_UNIT_AXIS = -1
_OWNER = "adaptive_grad_clip"  # Prefix of error messages about the options.

UnitAxes = int | None | Any | Callable[[optax.Params], Any]


class AdaptiveGradClipState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: statistics of the most recent update.

    Attributes:
      clipped_fraction: float32 scalar, fraction of output units (over all leaves that the
        mask selects for clipping) whose gradient was rescaled by the last update; 0 after
        ``init``.
      num_clipped: int32 scalar, number of output units rescaled by the last update.
      per_param_clipped_fraction: ``{parameter path: float32 scalar}`` for every clipped leaf
        when the transform was built with ``track_per_param=True``; an empty dict otherwise.
    """

    clipped_fraction: jax.Array
    num_clipped: jax.Array
    per_param_clipped_fraction: dict[str, jax.Array]


# --------------------------------------------------------------------------------------------
# Unit-wise norms and clipping.
# --------------------------------------------------------------------------------------------


def _reduction_axes(
    shape: tuple[int, ...], unit_axis: int | None, path: str = ""
) -> tuple[int, ...] | None:
    """Axes to reduce for the per-unit norm; None means the whole-tensor norm."""
    # Scalars and vectors (also vectors stored as (O, 1, 1, 1), PyTorch style) form one unit,
    # as in the reference release.
    if unit_axis is None or sum(d != 1 for d in shape) <= 1:
        return None
    ndim = len(shape)
    if isinstance(unit_axis, jax.Array):
        raise ValueError(
            f"adaptive_grad_clip: the unit axis for {path!r} is a JAX array; unit axes must "
            "be static Python ints (with optax.inject_hyperparams, pass "
            "static_args=('unit_axis',))"
        )
    if not isinstance(unit_axis, (int, np.integer)) or not -ndim <= unit_axis < ndim:
        raise ValueError(
            f"adaptive_grad_clip: unit axis {unit_axis!r} is invalid for the leaf {path!r} "
            f"of shape {shape}; give an int in [{-ndim}, {ndim - 1}] or None for the "
            "whole-tensor norm"
        )
    unit_axis = int(unit_axis) % ndim
    return tuple(i for i in range(ndim) if i != unit_axis)


def unitwise_norm(x: jax.Array, unit_axis: int | None = DEFAULT_UNIT_AXIS) -> jax.Array:
    """Float32 L2 norm of each output unit of ``x``, broadcastable against ``x``.

    Args:
      x: A parameter or gradient leaf.
      unit_axis: The output-unit axis (kept); all other axes are reduced. The default -1 suits
        Haiku / Flax kernels (conv HWIO, dense (in, out)); use 0 for OIHW / (out, in)
        layouts. ``None``, and any leaf with at most one non-singleton dimension (scalars,
        biases, gains), give the whole-tensor norm.

    Returns:
      Float32 array with ``x.ndim`` dimensions, size 1 along the reduced axes.
    """
    x = jnp.asarray(x)
    axes = _reduction_axes(x.shape, unit_axis)
    x32 = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x32 * x32, axis=axes, keepdims=True))


def _clip_leaf(
    g: jax.Array, w: jax.Array, clipping: Any, eps: Any, axes: tuple[int, ...] | None
) -> tuple[jax.Array, jax.Array]:
    """Clips one leaf; returns (clipped gradient, per-unit bool "was rescaled")."""
    g32 = g.astype(jnp.float32)
    w32 = jnp.asarray(w).astype(jnp.float32)
    g_norm = jnp.sqrt(jnp.sum(g32 * g32, axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(w32 * w32, axis=axes, keepdims=True))
    max_norm = clipping * jnp.maximum(w_norm, eps)
    # Same trigger as ||G_i|| / max(||W_i||, eps) > clipping, without a division.
    trigger = g_norm > max_norm
    scale = max_norm / jnp.maximum(g_norm, _DIV_EPS)
    clipped = (g32 * scale).astype(g.dtype)
    # Units under the bound keep their original bits.
    out = jnp.where(trigger, clipped, g)
    return out, trigger


def _clip_leaves(
    paths: list[str],
    grads: list[Any],
    weights: list[Any],
    clip: list[bool],
    axes: list[Any],
    clipping: Any,
    eps: Any,
    track_per_param: bool,
) -> tuple[list[Any], AdaptiveGradClipState]:
    """Clips every selected leaf; returns the new leaves and the statistics of this update."""
    new_grads, triggers, per_param = [], [], {}
    for path, g, w, do_clip, axis in zip(paths, grads, weights, clip, axes, strict=True):
        if g is None or not do_clip:
            new_grads.append(g)
            if do_clip and track_per_param:
                per_param[path] = jnp.zeros([], jnp.float32)
            continue
        if not hasattr(g, "shape") or tuple(g.shape) != tuple(jnp.shape(w)):
            raise ValueError(
                f"adaptive_grad_clip: the update for {path!r} has shape "
                f"{getattr(g, 'shape', type(g).__name__)} but the parameter has shape "
                f"{jnp.shape(w)}"
            )
        new_g, trigger = _clip_leaf(
            g, w, clipping, eps, _reduction_axes(tuple(g.shape), axis, path)
        )
        new_grads.append(new_g)
        triggers.append(trigger.reshape(-1))
        if track_per_param:
            per_param[path] = jnp.mean(trigger, dtype=jnp.float32)
    # One reduction over all units (rather than one per leaf) keeps compile time low.
    if triggers:
        all_units = jnp.concatenate(triggers)
        num_clipped = jnp.sum(all_units, dtype=jnp.int32)
        fraction = num_clipped.astype(jnp.float32) / all_units.size
    else:
        num_clipped = jnp.zeros([], jnp.int32)
        fraction = jnp.zeros([], jnp.float32)
    return new_grads, AdaptiveGradClipState(
        clipped_fraction=fraction, num_clipped=num_clipped, per_param_clipped_fraction=per_param
    )


def adaptive_grad_clip(
    clipping: float | jax.Array,
    eps: float | jax.Array = DEFAULT_EPS,
    *,
    mask: treepaths.MaskOrFn = None,
    unit_axis: UnitAxes = DEFAULT_UNIT_AXIS,
    track_per_param: bool = False,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping, unit-wise, as an optax gradient transformation.

    For each selected leaf ``W`` with update ``G`` and each output unit ``i``, if
    ``||G_i|| / max(||W_i||, eps) > clipping`` then
    ``G_i <- clipping * max(||W_i||, eps) / max(||G_i||, 1e-6) * G_i``; other units pass
    through bit for bit. Norms are computed in float32 whatever the dtypes; the result keeps
    the dtype of each update leaf. Put it first in an ``optax.chain`` so that it sees the raw
    (cross-device averaged) gradient and the true parameters.

    Unit layout: by default the output-unit axis of every leaf is its last axis, which is the
    Haiku / Flax convention (conv kernels HWIO reduce over (H, W, I), dense kernels (in, out)
    reduce over axis 0). Leaves with at most one non-singleton dimension (scalars, biases,
    gains, skip gains, also gains stored as (O, 1, 1, 1)) use the whole-tensor norm. For
    OIHW / (out, in) layouts (PyTorch-style code, Equinox ``Linear``/``Conv``) pass
    ``unit_axis=0``; mixed layouts take a pytree (or a function of params returning one) of
    per-leaf axes, where an entry ``None`` asks for the whole-tensor norm.

    Statistics: the state records the fraction (and number) of units that were rescaled by
    the last update, and with ``track_per_param=True`` the fraction per parameter; read them
    from any optimizer state containing this transform with :func:`clipped_fraction` and
    :func:`per_param_clipped_fraction`, without recomputing any norm.

    ``clipping`` and ``eps`` may be scheduled or changed at run time with
    ``optax.inject_hyperparams(adaptive_grad_clip, static_args=('unit_axis',))``.

    Args:
      clipping: The maximum ratio ``||G_i|| / max(||W_i||, eps)`` (lambda in the paper; 0.01
        in the reference NFNet recipe at batch 4096).
      eps: Floor on the weight norm, so zero-initialised parameters can still be updated.
      mask: Which leaves to clip: a pytree of bools with the structure of params (or a
        prefix of it), or a function ``params -> such a pytree``; True = clip, False = pass
        the update through untouched. None clips every leaf. See
        ``treepaths.exclude_paths``, ``treepaths.mask_from_patterns`` and
        ``models.registry.agc_mask``.
      unit_axis: The output-unit axis: an int for every leaf, or a pytree (prefix) / function
        of params giving an int or None per leaf. Default -1 (Haiku / Flax layouts).
      track_per_param: Also record the clipped fraction of each clipped leaf in the state.

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`AdaptiveGradClipState`.
      ``update(updates, state, params)`` requires ``params`` with the structure of
      ``updates``. ``None`` update leaves (parameters without gradient) pass through.

    Raises:
      ValueError: At ``init`` or ``update`` if the mask (including a path pattern that
        matches nothing) or the unit axes do not fit the params; at ``update`` if ``params``
        is None or the structures or shapes of ``updates`` and ``params`` differ.

    References:
      Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
      ICML 2021, https://arxiv.org/abs/2102.06171 (section 4).
    """
    if isinstance(clipping, (int, float)) and clipping <= 0:
        raise ValueError(f"adaptive_grad_clip: clipping must be > 0, got {clipping}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"adaptive_grad_clip: eps must be >= 0, got {eps}")

    def tracked_paths(params: optax.Params) -> list[str]:
        paths = treepaths.param_paths(params)
        clip = treepaths.mask_values(mask, params, owner=_OWNER)
        return [p for p, c in zip(paths, clip, strict=True) if c]

    def init_fn(params: optax.Params) -> AdaptiveGradClipState:
        # Resolving the mask and the unit axes here makes a bad pattern or axis fail at init.
        paths = tracked_paths(params)
        for path, leaf, axis in zip(
            treepaths.param_paths(params),
            jax.tree.leaves(params),
            treepaths.per_leaf(unit_axis, params, "unit_axis", _OWNER),
            strict=True,
        ):
            _reduction_axes(tuple(jnp.shape(leaf)), axis, path)
        per_param = {}
        if track_per_param:
            per_param = {p: jnp.zeros([], jnp.float32) for p in paths}
        return AdaptiveGradClipState(
            clipped_fraction=jnp.zeros([], jnp.float32),
            num_clipped=jnp.zeros([], jnp.int32),
            per_param_clipped_fraction=per_param,
        )

    def update_fn(
        updates: optax.Updates, state: AdaptiveGradClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AdaptiveGradClipState]:
        del state
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the current parameters: call "
                "update(updates, state, params) with params (AGC clips relative to the "
                "parameter norms)."
            )
        treedef = jax.tree.structure(params)
        try:
            grads = treedef.flatten_up_to(updates)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "adaptive_grad_clip: updates and params have different tree structures: "
                f"{treepaths.structure_diff(updates, params, 'updates', 'params')}"
            ) from err
        weights = treedef.flatten_up_to(params)
        paths = treepaths.param_paths(params)
        clip = treepaths.mask_values(mask, params, owner=_OWNER)
        axes = treepaths.per_leaf(unit_axis, params, "unit_axis", _OWNER)

        new_grads, new_state = _clip_leaves(
            paths, grads, weights, clip, axes, clipping, eps, track_per_param
        )
        return jax.tree.unflatten(treedef, new_grads), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Reading the statistics out of an optimizer state.
# --------------------------------------------------------------------------------------------


def find_state(opt_state: optax.OptState) -> AdaptiveGradClipState:
    """Finds the single :class:`AdaptiveGradClipState` inside any optax optimizer state.

    Works through ``optax.chain``, ``optax.masked``, ``optax.multi_transform``,
    ``optax.inject_hyperparams`` and other wrappers, whose states are pytrees.

    Args:
      opt_state: An optimizer state (possibly replicated by ``pmap``: leaves then carry a
        leading device axis).

    Returns:
      The AGC state.

    Raises:
      ValueError: If the state holds no AGC state, or more than one.
    """
    is_agc = lambda x: isinstance(x, AdaptiveGradClipState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_agc) if is_agc(x)]
    if not found:
        raise ValueError(
            "No adaptive_grad_clip state in this optimizer state: was the optimizer built "
            "with nfnets_jax.agc.adaptive_grad_clip (and AGC not disabled)?"
        )
    if len(found) > 1:
        raise ValueError(
            f"Found {len(found)} adaptive_grad_clip states in this optimizer state; "
            "use find_state on the sub-state you mean."
        )
    return found[0]


def clipped_fraction(opt_state: optax.OptState) -> jax.Array:
    """Fraction of units rescaled by AGC in the last update, read from ``opt_state``.

    Args:
      opt_state: Any optimizer state containing one :func:`adaptive_grad_clip` state.

    Returns:
      Float32 scalar (with a leading device axis under ``pmap``).
    """
    return find_state(opt_state).clipped_fraction


def per_param_clipped_fraction(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Per-parameter clipped fractions of the last update, ``{path: float32 scalar}``.

    Args:
      opt_state: Any optimizer state containing one :func:`adaptive_grad_clip` state.

    Returns:
      The dict recorded by the transform.

    Raises:
      ValueError: If the transform was built without ``track_per_param=True``.
    """
    state = find_state(opt_state)
    if not state.per_param_clipped_fraction:
        raise ValueError(
            "Per-parameter clipped fractions are not tracked: build the transform with "
            "adaptive_grad_clip(..., track_per_param=True)."
        )
    return state.per_param_clipped_fraction
