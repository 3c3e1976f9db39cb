"""Scaled activations: the gamma table makes each activation unit-variance on N(0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.models import activations

_N = 1 << 20


@pytest.mark.parametrize("name", sorted(activations.GAMMAS))
def test_gamma_gives_unit_variance(name):
    z = jax.random.normal(jax.random.PRNGKey(0), (_N, 2))
    y = np.asarray(activations.get(name)(z), dtype=np.float64).ravel()
    # Standard error of a sample variance ~ sqrt((kurtosis - 1) / n); allow 6 of them.
    kurt = np.mean((y - y.mean()) ** 4) / y.var() ** 2
    tol = 6 * np.sqrt((kurt - 1) / y.size)
    assert abs(y.var() - 1.0) < tol, (name, y.var(), tol)


@pytest.mark.parametrize("name", sorted(set(activations.GAMMAS) - {"glu"}))
def test_estimate_gamma_reproduces_table(name):
    # The reference's constants are Monte Carlo estimates, within 0.09% of the exact values.
    estimate = activations.estimate_gamma(activations.unscaled(name))
    assert estimate == pytest.approx(activations.GAMMAS[name], rel=1e-3)


def test_estimate_gamma_is_exact_for_relu():
    exact = 1 / np.sqrt(0.5 * (1 - 1 / np.pi))
    assert activations.estimate_gamma(activations.unscaled("relu")) == pytest.approx(
        exact, rel=1e-5
    )


def test_estimate_gamma_of_a_new_activation():
    # x -> 3x has std 3 under N(0, 1), so gamma = 1/3.
    assert activations.estimate_gamma(lambda x: 3 * x) == pytest.approx(1 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="zero variance"):
        activations.estimate_gamma(lambda x: 0 * x)


def test_default_gelu_is_the_tanh_approximation():
    x = jnp.linspace(-4, 4, 101)
    gamma = activations.GAMMAS["gelu"]
    np.testing.assert_allclose(
        activations.get("gelu")(x), jax.nn.gelu(x, approximate=True) * gamma, rtol=1e-6
    )
    assert not np.allclose(
        activations.get("gelu")(x), activations.get("gelu_exact")(x), rtol=1e-6, atol=0
    )


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown activation 'swish2'.*gelu.*relu"):
        activations.get("swish2")
