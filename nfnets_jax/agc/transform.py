"""The AGC optax transformation and its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax import treepaths
from nfnets_jax.agc import norms

# Floor on the weight norm, so zero-initialised parameters (skip gains, biases) can still move.
DEFAULT_EPS = 1e-3
_OWNER = "adaptive_grad_clip"  # Prefix of error messages about the options.

UnitAxes = int | None | Any | Callable[[optax.Params], Any]


@dataclasses.dataclass(frozen=True)
class AdaptiveGradClipState:
    """State of :func:`adaptive_grad_clip`: statistics of the most recent update.

    A pytree whose leaves are the first three fields, in this order (the leaves and their
    paths are those of the earlier NamedTuple state, so older checkpoints restore into it);
    `num_units` is static.

    Attributes:
      clipped_fraction: float32 scalar, fraction of output units (over all leaves that the
        mask selects for clipping and that had a gradient) whose gradient was rescaled by the
        last update; 0 after ``init``.
      num_clipped: int32 scalar, number of output units rescaled by the last update.
      per_param_clipped_fraction: ``{parameter path: float32 scalar}`` for every clipped leaf
        when the transform was built with ``track_per_param=True``; an empty dict otherwise.
      num_units: the number of output units the mask selects (a Python int, static: the same
        after ``init`` and every update), so that the statistics of several AGC states can
        be combined (`agc.clipped_fraction`).
    """

    clipped_fraction: jax.Array
    num_clipped: jax.Array
    per_param_clipped_fraction: dict[str, jax.Array]
    num_units: int = 0


jax.tree_util.register_dataclass(
    AdaptiveGradClipState,
    data_fields=["clipped_fraction", "num_clipped", "per_param_clipped_fraction"],
    meta_fields=["num_units"],
)


def _selected_units(params: Any, clip: list[bool], axes: list[Any]) -> int:
    shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)]
    return sum(_num_units(s, a) for s, a, c in zip(shapes, axes, clip, strict=True) if c)


def _leaf_axes(unit_axis: UnitAxes, params: Any, paths: list[str]) -> list[Any]:
    """Per leaf: the axes to reduce (None: whole tensor), validated."""
    explicit = not (unit_axis is None or isinstance(unit_axis, (int, np.integer)))
    axes = treepaths.per_leaf(unit_axis, params, "unit_axis", _OWNER)
    return [
        norms.reduction_axes(tuple(jnp.shape(leaf)), axis, path, explicit)
        for path, leaf, axis in zip(paths, jax.tree.leaves(params), axes, strict=True)
    ]


def _num_units(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> int:
    if axes is None:
        return 1
    return int(np.prod([d for i, d in enumerate(shape) if i not in axes], dtype=np.int64))


def _clip_leaves(
    paths: list[str],
    grads: list[Any],
    weights: list[Any],
    clip: list[bool],
    axes: list[Any],
    clipping: Any,
    eps: Any,
    track_per_param: bool,
    overflow_safe: bool,
    num_units: int,
) -> tuple[list[Any], AdaptiveGradClipState]:
    """Clips every selected leaf; returns the new leaves and the statistics of this update."""
    todo = []  # Indices of the leaves to clip.
    for i, (path, g, w, do_clip) in enumerate(zip(paths, grads, weights, clip, strict=True)):
        if g is None or not do_clip:
            continue
        if not hasattr(g, "shape") or tuple(g.shape) != tuple(jnp.shape(w)):
            raise ValueError(
                f"adaptive_grad_clip: the update for {path!r} has shape "
                f"{getattr(g, 'shape', type(g).__name__)} but the parameter has shape "
                f"{jnp.shape(w)}"
            )
        todo.append(i)
    # The norms of every gradient and weight to clip, with one overflow guard for all.
    unit_norms = norms.scaled_norms(
        [grads[i].astype(jnp.float32) for i in todo]
        + [jnp.asarray(weights[i]).astype(jnp.float32) for i in todo],
        [axes[i] for i in todo] * 2,
        overflow_safe,
    )
    new_grads, triggers, per_param = list(grads), [], {}
    for k, i in enumerate(todo):
        new_grads[i], trigger = norms.clip_leaf(
            grads[i], unit_norms[k], unit_norms[len(todo) + k], clipping, eps
        )
        triggers.append(trigger.reshape(-1))
        if track_per_param:
            per_param[paths[i]] = jnp.mean(trigger, dtype=jnp.float32)
    if track_per_param:  # Selected leaves without a gradient: nothing clipped.
        for path, g, do_clip in zip(paths, grads, clip, strict=True):
            if do_clip and g is None:
                per_param[path] = jnp.zeros([], jnp.float32)
        per_param = {p: per_param[p] for p, c in zip(paths, clip, strict=True) if c}
    # One reduction over all units (rather than one per leaf) keeps compile time low.
    if triggers:
        all_units = jnp.concatenate(triggers)
        num_clipped = jnp.sum(all_units, dtype=jnp.int32)
        fraction = num_clipped.astype(jnp.float32) / all_units.size
    else:
        num_clipped = jnp.zeros([], jnp.int32)
        fraction = jnp.zeros([], jnp.float32)
    return new_grads, AdaptiveGradClipState(
        clipped_fraction=fraction,
        num_clipped=num_clipped,
        per_param_clipped_fraction=per_param,
        num_units=num_units,
    )


def adaptive_grad_clip(
    clipping: float | jax.Array,
    eps: float | jax.Array = DEFAULT_EPS,
    *,
    mask: treepaths.MaskOrFn = None,
    unit_axis: UnitAxes = norms.DEFAULT_UNIT_AXIS,
    track_per_param: bool = False,
    overflow_safe: bool = True,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping, unit-wise, as an optax gradient transformation.

    For each selected leaf ``W`` with update ``G`` and each output unit ``i``, if
    ``||G_i|| > clipping * max(||W_i||, eps)`` then
    ``G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i``; other units pass through bit for
    bit. The rule is applied exactly for every ``clipping > 0`` and ``eps >= 0`` (the
    release's extra ``max(||G_i||, 1e-6)`` guard only differs when ``clipping * eps < 1e-6``,
    never in its recipes). Norms are computed in float32 whatever the dtypes, overflow-safe
    (a huge finite gradient is clipped to the bound, a tiny one is not lost); the result
    keeps the dtype of each update leaf. A unit whose gradient (or weight) norm is not finite
    passes through unchanged, so a NaN or inf reaches the update and the parameters, where
    the trainer's non-finite check stops the run. Put it first in an ``optax.chain`` so that
    it sees the raw (cross-device averaged) gradient and the true parameters.

    Unit layout: by default the output-unit axis of every leaf is its last axis, which is the
    Haiku / Flax convention (conv kernels HWIO reduce over (H, W, I), dense kernels (in, out)
    reduce over axis 0). Leaves with at most one non-singleton dimension (scalars, biases,
    gains, skip gains, also gains stored as (O, 1, 1, 1) or a (1, O) kernel) use the
    whole-tensor norm. For OIHW / (out, in) layouts (PyTorch-style code, Equinox
    ``Linear``/``Conv``) pass ``unit_axis=0``; mixed layouts take a pytree (or a function of
    params returning one) of per-leaf axes, where an entry ``None`` asks for the whole-tensor
    norm and an int is honoured for every leaf of two or more dimensions, a (1, O) kernel
    included.

    Statistics: the state records the fraction (and number) of units that were rescaled by
    the last update, and with ``track_per_param=True`` the fraction per parameter; read them
    from any optimizer state containing this transform (or several) with
    :func:`clipped_fraction`, :func:`find_states` and :func:`per_param_clipped_fraction`,
    without recomputing any norm.

    ``clipping`` and ``eps`` may be scheduled or changed at run time with
    ``optax.inject_hyperparams(adaptive_grad_clip, static_args=('mask', 'unit_axis'))``:
    inject_hyperparams calls every function argument as a schedule, so a mask or unit-axis
    function must be named static (without it, `treepaths.exclude_paths` masks raise saying
    so).

    Flax NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` works as is; Variable nodes are
    unwrapped, so paths are the same at init and update (``'linear/kernel'``).

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
      overflow_safe: Scale each unit by a power of two before its sum of squares (exact, the
        same bits wherever the plain float32 sums are in range; one more pass over the
        gradients and weights). False: the plain float32 sums, one pass, where a unit norm
        above ~1.8e19 overflows to inf (that unit then passes through unchanged) and one
        below ~1e-19 underflows (it only matters when ``clipping * eps`` is that small).

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

    def init_fn(params: optax.Params) -> AdaptiveGradClipState:
        # Resolving the mask and the unit axes here makes a bad pattern or axis fail at init.
        params = treepaths.unwrap_variables(params)
        paths = treepaths.param_paths(params)
        clip = treepaths.mask_values(mask, params, owner=_OWNER)
        axes = _leaf_axes(unit_axis, params, paths)
        per_param = {}
        if track_per_param:
            per_param = {p: jnp.zeros([], jnp.float32) for p, c in zip(paths, clip) if c}
        return AdaptiveGradClipState(
            clipped_fraction=jnp.zeros([], jnp.float32),
            num_clipped=jnp.zeros([], jnp.int32),
            per_param_clipped_fraction=per_param,
            num_units=_selected_units(params, clip, axes),
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
        params = treepaths.unwrap_variables(params)
        wrapped = updates if treepaths.has_variables(updates) else None
        updates = treepaths.unwrap_variables(updates)
        treedef = jax.tree.structure(params)
        try:
            grads = treedef.flatten_up_to(updates)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "adaptive_grad_clip: updates and params have different tree structures: "
                f"{treepaths.structure_diff(updates, params, 'updates', 'params')}"
            ) from err
        paths = treepaths.param_paths(params)
        clip = treepaths.mask_values(mask, params, owner=_OWNER)
        axes = _leaf_axes(unit_axis, params, paths)
        new_grads, new_state = _clip_leaves(
            paths,
            grads,
            treedef.flatten_up_to(params),
            clip,
            axes,
            clipping,
            eps,
            track_per_param,
            overflow_safe,
            _selected_units(params, clip, axes),
        )
        out = jax.tree.unflatten(treedef, new_grads)
        if wrapped is not None:  # Give NNX Variables back as they came.
            out = jax.tree.unflatten(jax.tree.structure(wrapped), jax.tree.leaves(out))
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
