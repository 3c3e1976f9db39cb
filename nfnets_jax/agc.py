"""Adaptive gradient clipping (AGC) as an optax gradient transformation.

AGC (Brock et al. 2021, section 4) rescales the gradient of every output unit whose norm is
large relative to the norm of that unit's weights. For a leaf ``W`` with gradient ``G`` and
output unit ``i``::

    if ||G_i|| / max(||W_i||, eps) > clipping:
        G_i <- clipping * max(||W_i||, eps) / max(||G_i||, 1e-6) * G_i

This module holds the transformation (:func:`adaptive_grad_clip`), the unit-wise norm it uses
(:func:`unitwise_norm`), helpers that build masks from parameter paths
(:func:`mask_from_patterns`, :func:`exclude_paths`, :func:`nfnet_mask`), and helpers that read
the clipping statistics out of any optax optimizer state (:func:`clipped_fraction`,
:func:`per_param_clipped_fraction`).

Parameter paths are the pytree key path joined with ``/``. For Haiku's two-level dicts this
is ``'<module path>/<param name>'``, e.g. ``'NFNet/~/linear/w'``; for Flax
``{'params': {'Dense_0': {'kernel': ...}}}`` it is ``'params/Dense_0/kernel'``; list and
tuple entries contribute their index, dataclass / attribute nodes their attribute name.

References:
  Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
  Normalization", ICML 2021, https://arxiv.org/abs/2102.06171
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Floor on the weight norm, so zero-initialised parameters (skip gains, biases) can still move.
DEFAULT_EPS = 1e-3
# Guards the division by the gradient norm; distinct from `eps` and in practice never active,
# because a unit is only rescaled when its gradient norm exceeds clipping * eps > 0.
_DIV_EPS = 1e-6
# Default output-unit axis: Haiku and Flax store kernels with output units last
# (conv HWIO, dense (in, out)).
DEFAULT_UNIT_AXIS = -1

# Path of the classifier weight of this project's models; the paper does not clip it.
NFNET_CLASSIFIER_PATTERN = r"(?:.*/~/)?(?:NFNet|NF_ResNet)/~/linear/w"

Mask = Any  # pytree of bools (or a prefix of the params tree); True = clip.
MaskOrFn = Mask | Callable[[optax.Params], Mask] | None
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
# Parameter paths and masks.
# --------------------------------------------------------------------------------------------


def _key_to_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(key_path: Sequence[Any]) -> str:
    """Joins a JAX key path into a ``'/'``-separated parameter path.

    Args:
      key_path: A key path as returned by ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The path string, e.g. ``'NFNet/~/linear/w'`` for Haiku parameters.
    """
    return "/".join(_key_to_str(k) for k in key_path)


def param_paths(params: optax.Params) -> list[str]:
    """Returns the path of every leaf of ``params``, in ``jax.tree.leaves`` order.

    Args:
      params: Any pytree of parameters.

    Returns:
      One ``'/'``-joined path string per leaf.
    """
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile_patterns(patterns: str | Sequence[str], syntax: str) -> list[tuple[str, Any]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if syntax == "regex":
        return [(p, re.compile(p).fullmatch) for p in patterns]
    if syntax == "glob":
        return [(p, lambda s, p=p: fnmatch.fnmatchcase(s, p)) for p in patterns]
    raise ValueError(f"syntax must be 'regex' or 'glob', got {syntax!r}")


def _match_all(
    paths: list[str], patterns: str | Sequence[str], syntax: str, what: str
) -> list[bool]:
    """Whether each path matches any pattern; every pattern must match at least one path."""
    compiled = _compile_patterns(patterns, syntax)
    hits = [False] * len(paths)
    unmatched = []
    for text, matcher in compiled:
        matched = False
        for i, path in enumerate(paths):
            if matcher(path):
                hits[i] = True
                matched = True
        if not matched:
            unmatched.append(text)
    if unmatched:
        listing = "\n  ".join(paths) if paths else "(the tree has no leaves)"
        raise ValueError(
            f"{what} pattern(s) {unmatched} ({syntax}, full match) matched no parameter. "
            f"Available parameter paths:\n  {listing}"
        )
    return hits


def mask_from_patterns(
    params: optax.Params,
    *,
    exclude: str | Sequence[str] = (),
    include: str | Sequence[str] | None = None,
    syntax: str = "regex",
) -> Mask:
    """Builds a clip mask (True = clip) from parameter-path patterns.

    A leaf is selected when ``include`` is None or its path matches one of the ``include``
    patterns, and its path matches none of the ``exclude`` patterns. Patterns must match the
    whole path (``re.fullmatch`` for ``'regex'``, ``fnmatch.fnmatchcase`` for ``'glob'``,
    where ``*`` also matches ``/``). A pattern that matches no parameter raises, so a typo
    never silently turns into "clip everything".

    Args:
      params: The parameter pytree.
      exclude: Pattern(s) of paths to leave unclipped, e.g. ``r'NFNet/~/linear/w'``.
      include: Optional pattern(s) restricting clipping to matching paths.
      syntax: ``'regex'`` or ``'glob'``.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Raises:
      ValueError: If a pattern matches no parameter (the message lists every path), or
        ``syntax`` is unknown.
    """
    leaves, treedef = jax.tree.flatten(params)
    paths = param_paths(params)
    selected = [True] * len(leaves)
    if include is not None:
        selected = _match_all(paths, include, syntax, "include")
    excluded = _match_all(paths, exclude, syntax, "exclude") if exclude else [False] * len(paths)
    return jax.tree.unflatten(
        treedef, [s and not e for s, e in zip(selected, excluded, strict=True)]
    )


def exclude_paths(*patterns: str, syntax: str = "regex") -> Callable[[optax.Params], Mask]:
    """Returns a mask function clipping every leaf except those matching ``patterns``.

    Use it directly as the ``mask`` of :func:`adaptive_grad_clip`; the patterns are checked
    against the actual parameter tree when the optimizer is initialised.

    Args:
      *patterns: Path patterns to leave unclipped (see :func:`mask_from_patterns`).
      syntax: ``'regex'`` or ``'glob'``.

    Returns:
      A function ``params -> pytree of bools``.
    """
    if not patterns:
        raise ValueError("exclude_paths needs at least one pattern")
    return lambda params: mask_from_patterns(params, exclude=patterns, syntax=syntax)


def nfnet_mask(params: optax.Params) -> Mask:
    """The reference AGC mask for NFNet / NF-ResNet parameters: clip all but the classifier w.

    Excludes exactly the top-level classifier weight, ``'NFNet/~/linear/w'`` (or
    ``'NF_ResNet/~/linear/w'``, the reference's NF-ResNet root name), also when the model
    sits inside an outer Haiku module. The squeeze-excite layers
    (``'.../squeeze_excite/~/linear'``), the classifier bias, gains, biases and skip gains
    are all clipped, as in the reference.

    Args:
      params: Haiku parameters of an ``NFNet`` or ``NFResNet``.

    Returns:
      A pytree of bools, True = clip.

    Raises:
      ValueError: If the tree has no classifier weight under that name (lists the paths).
    """
    return mask_from_patterns(params, exclude=NFNET_CLASSIFIER_PATTERN)


# --------------------------------------------------------------------------------------------
# Broadcasting per-leaf options (masks, unit axes) against the params tree.
# --------------------------------------------------------------------------------------------


def _structure_diff(a: Any, b: Any, a_name: str, b_name: str) -> str:
    a_paths = set(param_paths(a))
    b_paths = set(param_paths(b))
    only_a = sorted(a_paths - b_paths)
    only_b = sorted(b_paths - a_paths)
    parts = []
    if only_a:
        parts.append(f"only in {a_name}: {only_a[:10]}" + (" ..." if len(only_a) > 10 else ""))
    if only_b:
        parts.append(f"only in {b_name}: {only_b[:10]}" + (" ..." if len(only_b) > 10 else ""))
    if not parts:
        parts.append(f"{a_name}: {jax.tree.structure(a)}; {b_name}: {jax.tree.structure(b)}")
    return "; ".join(parts)


def _per_leaf(option: Any, params: optax.Params, what: str) -> list[Any]:
    """Broadcasts ``option`` (a pytree that is a prefix of ``params``) to one value per leaf.

    ``None`` entries of ``option`` are values, not empty subtrees.
    """
    if callable(option):
        option = option(params)
    is_none = lambda x: x is None
    try:
        expanded = jax.tree.map(
            lambda v, sub: jax.tree.map(lambda _: v, sub), option, params, is_leaf=is_none
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"adaptive_grad_clip: the {what} tree does not match the params tree (it must "
            f"have the same structure as params, or be a prefix of it): "
            f"{_structure_diff(option, params, what, 'params')}"
        ) from err
    return jax.tree.structure(params).flatten_up_to(expanded)


def _mask_values(mask: MaskOrFn, params: optax.Params, paths: list[str]) -> list[bool]:
    if mask is None:
        return [True] * len(paths)
    values = _per_leaf(mask, params, "mask")
    out = []
    for path, value in zip(paths, values, strict=True):
        try:
            out.append(bool(value))
        except jax.errors.ConcretizationTypeError as err:
            raise ValueError(
                f"adaptive_grad_clip: the mask entry for {path!r} is a traced value; masks "
                "must be static Python bools (build them from the tree's paths, not its "
                "values)"
            ) from err
    return out


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


def adaptive_grad_clip(
    clipping: float | jax.Array,
    eps: float | jax.Array = DEFAULT_EPS,
    *,
    mask: MaskOrFn = None,
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
        the update through untouched. None clips every leaf. See :func:`nfnet_mask`,
        :func:`exclude_paths` and :func:`mask_from_patterns`.
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
        paths = param_paths(params)
        clip = _mask_values(mask, params, paths)
        return [p for p, c in zip(paths, clip, strict=True) if c]

    def init_fn(params: optax.Params) -> AdaptiveGradClipState:
        # Resolving the mask and the unit axes here makes a bad pattern or axis fail at init.
        paths = tracked_paths(params)
        for path, leaf, axis in zip(
            param_paths(params),
            jax.tree.leaves(params),
            _per_leaf(unit_axis, params, "unit_axis"),
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
                f"{_structure_diff(updates, params, 'updates', 'params')}"
            ) from err
        weights = treedef.flatten_up_to(params)
        paths = param_paths(params)
        clip = _mask_values(mask, params, paths)
        axes = _per_leaf(unit_axis, params, "unit_axis")

        new_grads = []
        triggers = []
        per_param = {}
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
            red = _reduction_axes(tuple(g.shape), axis, path)
            new_g, trigger = _clip_leaf(g, w, clipping, eps, red)
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
        new_state = AdaptiveGradClipState(
            clipped_fraction=fraction, num_clipped=num_clipped, per_param_clipped_fraction=per_param
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
