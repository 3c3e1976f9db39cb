"""Scaled activations: act(x) * gamma, with gamma ~= 1 / std(act(z)) for z ~ N(0, 1).

The gamma constants are the reference release's (REFERENCE §1), kept bit for bit because the
released weights were trained with them. They are Monte Carlo estimates: `estimate_gamma`
computes the exact value by quadrature (e.g. relu: 1/sqrt((1 - 1/pi)/2) = 1.712849 vs the
table's 1.713959), within 0.09% of every table entry, for any new activation.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]

# Exactly the reference's constants (float32 values printed to full precision).
GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "celu": 1.270926833152771,
    "selu": 1.0008515119552612,
    "leaky_relu": 1.70590341091156,
    "relu6": 1.7131484746932983,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "soft_sign": 2.338853120803833,
    "log_sigmoid": 1.9193484783172607,
    "glu": 1.8484294414520264,
}

# The unscaled functions. `gelu` is jax's default tanh approximation, which the released
# weights were trained with; `gelu_exact` (erf form, as in PyTorch/timm) shares its gamma.
_BASE: dict[str, Activation] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    "leaky_relu": jax.nn.leaky_relu,
    "relu6": jax.nn.relu6,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "soft_sign": jax.nn.soft_sign,
    "log_sigmoid": jax.nn.log_sigmoid,
    # GLU halves the last axis: value * sigmoid(gate).
    "glu": jax.nn.glu,
}


def names() -> list[str]:
    """Names accepted by `get`."""
    return sorted(_BASE)


def gamma(name: str) -> float:
    """The reference gamma for activation `name` (`gelu_exact` uses gelu's)."""
    return GAMMAS["gelu" if name == "gelu_exact" else _check(name)]


def unscaled(name: str) -> Activation:
    """The plain activation function called `name`."""
    return _BASE[_check(name)]


def get(name: str) -> Activation:
    """The scaled activation `x -> act(x) * gamma` for `name`."""
    fn, g = unscaled(name), gamma(name)
    if g == 1.0:
        return fn

    def scaled(x: jax.Array) -> jax.Array:
        return fn(x) * jnp.asarray(g, dtype=x.dtype)

    scaled.__name__ = f"scaled_{name}"
    return scaled


def estimate_gamma(fn: Activation, num_points: int = 2001, half_width: float = 12.0) -> float:
    """Estimates gamma = 1 / std(fn(z)), z ~ N(0, 1), by dense quadrature in float64.

    A trapezoid rule on a fine grid over [-half_width, half_width] converges fast for the
    Gaussian density, also for functions with kinks (relu), and is deterministic, unlike a
    Monte Carlo estimate. `fn` is evaluated once on a float64 NumPy array, with
    jax x64 off it runs in float32, which bounds the accuracy at ~1e-6 relative.

    Args:
      fn: an elementwise activation (jax or numpy). GLU-style activations that change
        the shape are not elementwise; pass an elementwise equivalent instead.
      num_points: grid size.
      half_width: the grid spans [-half_width, half_width] standard deviations.

    Returns:
      The gamma that makes `fn(z) * gamma` unit-variance.
    """
    z = np.linspace(-half_width, half_width, num_points)
    density = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    y = np.asarray(fn(z), dtype=np.float64)
    if y.shape != z.shape:
        raise ValueError(
            f"estimate_gamma needs an elementwise fn; got shape {y.shape} "
            f"for input shape {z.shape}."
        )
    mean = np.trapezoid(y * density, z)
    var = np.trapezoid((y - mean) ** 2 * density, z)
    if not var > 0:
        raise ValueError("fn(z) has zero variance under N(0, 1); gamma is undefined.")
    return float(1.0 / np.sqrt(var))


def _check(name: str) -> str:
    if name not in _BASE:
        raise ValueError(f"Unknown activation {name!r}; valid names: {', '.join(names())}.")
    return name
