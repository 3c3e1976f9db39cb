"""Adaptive gradient clipping (AGC) as an optax gradient transformation.

AGC (Brock et al. 2021, section 4) rescales the gradient of every output unit whose norm is
large relative to the norm of that unit's weights. For a leaf ``W`` with gradient ``G`` and
output unit ``i``::

    if ||G_i|| > clipping * max(||W_i||, eps):
        G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i

The package holds the transformation (:func:`adaptive_grad_clip` and its state, in
`transform`), the unit-wise norms and the per-leaf arithmetic (:func:`unitwise_norm`, in
`norms`), and readers of the clipping statistics in any optax optimizer state
(:func:`find_state`, :func:`find_states`, :func:`clipped_fraction`,
:func:`per_param_clipped_fraction`, in `stats`). Masks are pytrees of bools or functions of
the params: `nfnets_jax.treepaths` builds them from parameter-path patterns
(``exclude_paths``, ``mask_from_patterns``), and `nfnets_jax.models.registry.agc_mask` is the
reference NFNet mask (everything but the classifier weight).

References:
  Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
  Normalization", ICML 2021, https://arxiv.org/abs/2102.06171
"""

from nfnets_jax.agc.norms import DEFAULT_UNIT_AXIS, unitwise_norm
from nfnets_jax.agc.stats import (
    clipped_fraction,
    find_state,
    find_states,
    per_param_clipped_fraction,
)
from nfnets_jax.agc.transform import DEFAULT_EPS, AdaptiveGradClipState, adaptive_grad_clip

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_UNIT_AXIS",
    "AdaptiveGradClipState",
    "adaptive_grad_clip",
    "clipped_fraction",
    "find_state",
    "find_states",
    "per_param_clipped_fraction",
    "unitwise_norm",
]
