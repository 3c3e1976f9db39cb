"""Executes the Python examples of the docs/agc.md section "Use AGC in your own project" (and
the README's short AGC example) and checks what they promise against an independent numpy
computation of the AGC rule."""

import pathlib
import re

import jax
import numpy as np
import optax
import pytest

from nfnets_jax import agc, treepaths

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGC_DOC = ROOT / "docs" / "agc.md"
README = ROOT / "README.md"
HEADING = "## Use AGC in your own project"
EPS = 1e-3  # The paper's (and the docs formula's default) floor on ||W_i||.


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def agc_section_blocks() -> list[str]:
    text = AGC_DOC.read_text()
    assert HEADING in text, f"docs/agc.md lost its {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
    return python_blocks(section)


BLOCKS = agc_section_blocks()
# The README's own AGC example (the front page's "AGC in your own project").
README_AGC_BLOCKS = [b for b in python_blocks(README.read_text()) if "adaptive_grad_clip" in b]
# Per example: (lambda, the leaf the example leaves unclipped, output-unit axis).
PROMISES = {
    0: (0.01, "mlp/~/linear_1/w", -1),
    1: (0.01, "params/head/kernel", -1),
    2: (0.01, "head/kernel", -1),
    3: (0.01, "fc/weight", 0),
    4: (0.01, "layers/1/weight", 0),
    5: (0.01, "NFNet/~/linear/w", -1),
}
OPTIMIZER_EXAMPLE = 5


def test_section_has_haiku_linen_nnx_pytree_equinox_and_optimizer_examples():
    assert len(BLOCKS) == len(PROMISES)
    assert "import haiku" in BLOCKS[0]
    assert "import flax.linen" in BLOCKS[1]
    assert "from flax import nnx" in BLOCKS[2] and "nnx.Optimizer" in BLOCKS[2]
    assert "unit_axis=0" in BLOCKS[3]
    assert "import equinox" in BLOCKS[4] and "unit_axis=0" in BLOCKS[4]
    assert "optim.make_optimizer" in BLOCKS[OPTIMIZER_EXAMPLE]


@pytest.fixture
def agc_calls(monkeypatch):
    """Records (gradients, params, clipped gradients, units clipped) of every AGC update."""
    calls = []
    real = agc.adaptive_grad_clip

    def spy(*args, **kwargs):
        tx = real(*args, **kwargs)

        def update(updates, state, params=None):
            out, new_state = tx.update(updates, state, params)
            jax.debug.callback(
                lambda *a: calls.append(jax.device_get(a)),
                updates,
                params,
                out,
                new_state.num_clipped,
            )
            return out, new_state

        return optax.GradientTransformation(tx.init, update)

    monkeypatch.setattr(agc, "adaptive_grad_clip", spy)
    return calls


def unit_norms(x, unit_axis):
    """Float64 L2 norm per output unit (keepdims); vectors and scalars are one unit."""
    x = np.asarray(x, np.float64)
    axes = None if x.ndim <= 1 else tuple(i for i in range(x.ndim) if i != unit_axis % x.ndim)
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def check_agc_call(call, clipping, excluded, unit_axis):
    """Checks one recorded update leaf by leaf; returns the numbers of units over / under."""
    grads, params, out, num_clipped = call
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = zip(flat, jax.tree.leaves(grads), jax.tree.leaves(out), strict=True)
    over = under = 0
    for (path, w), g, c in leaves:
        name = treepaths.path_to_str(path)
        g, c = np.asarray(g), np.asarray(c)
        max_norm = clipping * np.maximum(unit_norms(w, unit_axis), EPS)
        g_norm = unit_norms(g, unit_axis)
        if name == excluded:
            assert np.any(g_norm > max_norm), f"{name}: the example does not test the skip"
            np.testing.assert_array_equal(c, g, err_msg=f"{name} was excluded")
            continue
        is_over = np.broadcast_to(g_norm > max_norm, g.shape)
        # Units over the bound: same direction, norm exactly clipping * max(||W_i||, eps).
        np.testing.assert_allclose(
            np.where(is_over, c, 0.0),
            np.where(is_over, g * max_norm / np.where(is_over, g_norm, 1.0), 0.0),
            rtol=2e-6,
            atol=1e-12,
            err_msg=name,
        )
        np.testing.assert_allclose(
            unit_norms(c, unit_axis),
            np.where(g_norm > max_norm, max_norm, g_norm),
            rtol=2e-6,
            err_msg=name,
        )
        # Units under it: the same bits.
        np.testing.assert_array_equal(c[~is_over], g[~is_over], err_msg=name)
        over += int(np.sum(g_norm > max_norm))
        under += int(np.sum(g_norm <= max_norm))
    assert int(num_clipped) == over
    return over, under


def optimizer_example_update(namespace, calls):
    """One real update of the docs' reference optimizer on a small NFNet-named tree."""
    rng = np.random.default_rng(0)
    shapes = {
        "NFNet/~/stem_conv0": {"w": (3, 3, 3, 4), "gain": (4,), "bias": (4,)},
        "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (4, 2), "b": (2,)},
        "NFNet/~/linear": {"w": (4, 10), "b": (10,)},
    }
    params = jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    # ||G_i|| / ||W_i|| is 0.005 (under lambda) for the stem kernel, 0.02 (over) elsewhere.
    grads = jax.tree.map(lambda w: 0.02 * w, params)
    grads["NFNet/~/stem_conv0"]["w"] = 0.005 * params["NFNet/~/stem_conv0"]["w"]
    optimizer = namespace["optimizer"]
    optimizer.update(grads, optimizer.init(params), params)
    assert len(calls) == 1
    over, under = check_agc_call(calls[0], *PROMISES[OPTIMIZER_EXAMPLE])
    # Over: stem gain and bias, SE w (2 units) and b, classifier b; under: the stem's 4 units.
    assert (over, under) == (6, 4)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_example_runs_and_clips_as_promised(index, agc_calls):
    namespace = {"__name__": f"docs_agc_example_{index}"}
    exec(compile(BLOCKS[index], f"docs/agc.md[AGC example {index}]", "exec"), namespace)
    # Every example builds an optimizer state holding AGC statistics in [0, 1].
    state = agc.find_state(
        namespace["opt_state"] if "opt_state" in namespace else namespace["state"]
    )
    fraction = state.clipped_fraction
    assert fraction.shape == () and fraction.dtype == np.float32
    if isinstance(fraction, jax.ShapeDtypeStruct):  # the last example only traces shapes
        assert not agc_calls
        optimizer_example_update(namespace, agc_calls)
        return
    assert len(agc_calls) == 1  # one update per example
    over, under = check_agc_call(agc_calls[0], *PROMISES[index])
    assert over > 0, "the example clips nothing"
    assert float(fraction) == pytest.approx(over / (over + under))


def test_readme_front_page_agc_example_runs_and_clips_as_promised(agc_calls):
    assert len(README_AGC_BLOCKS) == 1, "README.md should hold one short AGC example"
    namespace = {"__name__": "readme_agc_example"}
    exec(compile(README_AGC_BLOCKS[0], "README.md[AGC example]", "exec"), namespace)
    assert len(agc_calls) == 1
    over, under = check_agc_call(agc_calls[0], *PROMISES[0])  # The Haiku MLP's promise.
    assert over > 0, "the example clips nothing"
    fraction = agc.clipped_fraction(namespace["opt_state"])
    assert float(fraction) == pytest.approx(over / (over + under))
