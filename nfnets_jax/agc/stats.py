"""Reading AGC's clipping statistics out of any optax optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nfnets_jax import treepaths
from nfnets_jax.agc.transform import AdaptiveGradClipState

_is_agc = lambda x: isinstance(x, AdaptiveGradClipState)  # noqa: E731


def find_states(opt_state: optax.OptState) -> dict[str, AdaptiveGradClipState]:
    """Every :class:`AdaptiveGradClipState` inside an optimizer state, by its path there.

    Works through ``optax.chain``, ``optax.masked``, ``optax.multi_transform``,
    ``optax.inject_hyperparams`` and other wrappers, whose states are pytrees. The paths are
    the states' key paths joined with ``/`` (``'0'`` for the first element of a chain,
    ``'inner_states/conv/inner_state/0'`` under a multi_transform), in tree order.

    Args:
      opt_state: An optimizer state (possibly replicated by ``pmap``: leaves then carry a
        leading device axis).

    Returns:
      ``{path: state}``; empty if the state holds no AGC state.
    """
    # Flax NNX keeps the optax state in Variables (nnx.Optimizer.opt_state): read the values.
    opt_state = treepaths.unwrap_variables(opt_state)
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_agc)[0]
    return {treepaths.path_to_str(path): x for path, x in flat if _is_agc(x)}


def find_state(opt_state: optax.OptState) -> AdaptiveGradClipState:
    """Finds the single :class:`AdaptiveGradClipState` inside any optax optimizer state.

    Args:
      opt_state: An optimizer state (see :func:`find_states`).

    Returns:
      The AGC state.

    Raises:
      ValueError: If the state holds no AGC state, or more than one (then use
        :func:`find_states`, or :func:`clipped_fraction` for the combined fraction).
    """
    found = find_states(opt_state)
    if not found:
        raise ValueError(
            "No adaptive_grad_clip state in this optimizer state: was the optimizer built "
            "with nfnets_jax.agc.adaptive_grad_clip (and AGC not disabled)?"
        )
    if len(found) > 1:
        raise ValueError(
            f"Found {len(found)} adaptive_grad_clip states in this optimizer state, at "
            f"{sorted(found)}: use agc.find_states to read each, or agc.clipped_fraction "
            "for the fraction over all of them."
        )
    return next(iter(found.values()))


def clipped_fraction(opt_state: optax.OptState) -> jax.Array:
    """Fraction of units rescaled by AGC in the last update, read from ``opt_state``.

    With several AGC states (e.g. one per ``optax.multi_transform`` group) this is the
    fraction over all their units: their clipped units over their selected units (units of
    leaves without a gradient count as not clipped).

    Args:
      opt_state: Any optimizer state containing at least one :func:`adaptive_grad_clip`
        state.

    Returns:
      Float32 scalar (with a leading device axis under ``pmap``).

    Raises:
      ValueError: If the state holds no AGC state.
    """
    found = find_states(opt_state)
    if len(found) <= 1:
        return find_state(opt_state).clipped_fraction
    clipped = sum(s.num_clipped for s in found.values())
    units = sum(s.num_units for s in found.values())
    return jnp.asarray(clipped, jnp.float32) / max(units, 1)


def per_param_clipped_fraction(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Per-parameter clipped fractions of the last update, ``{path: float32 scalar}``.

    With several AGC states the dicts are merged (each parameter is clipped by one of them).

    Args:
      opt_state: Any optimizer state containing :func:`adaptive_grad_clip` states.

    Returns:
      The dict(s) recorded by the transform(s).

    Raises:
      ValueError: If there is no AGC state, or none was built with
        ``track_per_param=True``.
    """
    found = find_states(opt_state) or {"": find_state(opt_state)}
    merged = {}
    for state in found.values():
        merged.update(state.per_param_clipped_fraction)
    if not merged:
        raise ValueError(
            "Per-parameter clipped fractions are not tracked: build the transform with "
            "adaptive_grad_clip(..., track_per_param=True)."
        )
    return merged
