"""Parameter and multiply-accumulate (MAC) counts for any model and resolution, no compute.

MACs are read off the traced program (jaxpr): every convolution and every matrix product
(classifier and squeeze-excite) contributes (output elements) x (reduction length). This
reproduces the published counts (REFERENCE §1: F0 12.38B at 256 px ... F7 478.78B at 608 px);
leaving out the squeeze-excite matmuls would give 12.36B for F0. Grouped convolutions are
traced with the "native" strategy (and autodiff-ready "xla" convolutions) so the count does
not depend on the execution strategy.
"""

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.models import layers


def count_params(params: hk.Params) -> int:
    """Total number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _sub_jaxprs(value: Any):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _eqn_macs(eqn) -> int:
    """MACs of one equation (0 unless it is a convolution or a matrix product)."""
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        out = eqn.outvars[0].aval
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        kernel_in = rhs.shape[rhs_spec[1]]
        spatial = int(np.prod([rhs.shape[d] for d in rhs_spec[2:]]))
        return int(np.prod(out.shape)) * kernel_in * spatial
    if name == "dot_general":
        lhs = eqn.invars[0].aval
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        contract = int(np.prod([lhs.shape[d] for d in lhs_contract]))
        return int(np.prod(eqn.outvars[0].aval.shape)) * contract
    return 0


def _walk(jaxpr) -> list[int]:
    found = []
    for eqn in jaxpr.eqns:
        found.append(_eqn_macs(eqn))
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found.extend(_walk(sub))
    return found


def count_macs(apply_fn: Callable[..., Any], *args: Any) -> int:
    """MACs of `apply_fn(*args)` per call (args may be arrays or ShapeDtypeStructs)."""
    return sum(_walk(jax.make_jaxpr(apply_fn)(*args).jaxpr))


def model_counts(model: hk.Transformed, resolution: int, batch: int = 1) -> dict[str, int]:
    """Parameter count, module count and per-image MACs of a Haiku model, in inference mode.

    Args:
      model: from `registry.build_forward` (or any transform whose `init(rng, images)` and
        `apply(params, rng, images)` run the model), e.g. `registry.build_forward(
        "NFNet", variant="F0")`.
      resolution: square input size in pixels.
      batch: batch size to trace with (MACs are reported per image).

    Returns:
      {"params": scalars, "modules": Haiku modules with parameters, "macs": per image}.
    """
    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    with layers.forced_group_conv("native"), layers.forced_conv_grad("xla"):
        macs = count_macs(lambda p, x: model.apply(p, None, x), params, images)
    return {"params": count_params(params), "modules": len(params), "macs": macs // batch}
