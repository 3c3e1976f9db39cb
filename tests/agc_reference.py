"""Independent float64 NumPy versions of the AGC rule, shared by the AGC tests.

Written from the paper's rule (section 4) and REFERENCE section 3, not from any
implementation: per-unit norms in float64, no division guard.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import agc
from nfnets_jax.models import nfnet

CLASSIFIER_W = "NFNet/~/linear/w"


def np_unit_norms(x: np.ndarray, unit_axis: int | None = -1, explicit: bool = False) -> np.ndarray:
    """Float64 per-unit norms (keepdims): scalars and vectors are one unit, and so are leaves
    with one non-singleton dimension unless the axis was given for the leaf (``explicit``)."""
    x = np.asarray(x, np.float64)
    if unit_axis is None or x.ndim <= 1 or (not explicit and sum(d != 1 for d in x.shape) <= 1):
        return np.sqrt(np.sum(x * x, keepdims=True))
    axis = unit_axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def np_agc_leaf(g, w, clipping: float, eps: float = 1e-3, unit_axis=-1, explicit=False):
    """The rule, exactly: units with ||G_i|| / max(||W_i||, eps) > clipping are rescaled to
    norm clipping * max(||W_i||, eps); the others are returned unchanged (float64)."""
    g = np.asarray(g, np.float64)
    g_norm = np_unit_norms(g, unit_axis, explicit)
    w_norm = np.maximum(np_unit_norms(w, unit_axis, explicit), eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        trigger = g_norm > clipping * w_norm
        scale = np.where(trigger, clipping * w_norm / np.where(trigger, g_norm, 1.0), 1.0)
    return np.where(trigger, g * scale, g)


def clip(tree_g, tree_w, clipping, **kwargs):
    tx = agc.adaptive_grad_clip(clipping, **kwargs)
    return tx.update(tree_g, tx.init(tree_w), tree_w)


@functools.cache
def f0_shapes():
    forward = hk.transform(lambda x: nfnet.NFNet(variant="F0")(x, is_training=True))
    return jax.eval_shape(
        lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    )
