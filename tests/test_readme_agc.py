"""Executes the Python examples of the README section "Use AGC in your own project"."""

import pathlib
import re

import jax
import numpy as np
import pytest

from nfnets_jax import agc

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use AGC in your own project"


def agc_section_blocks() -> list[str]:
    text = README.read_text()
    assert HEADING in text, f"README.md lost its {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


BLOCKS = agc_section_blocks()


def test_section_has_haiku_flax_pytree_and_optimizer_examples():
    assert len(BLOCKS) == 4
    assert "import haiku" in BLOCKS[0]
    assert "import flax" in BLOCKS[1]
    assert "unit_axis=0" in BLOCKS[2]
    assert "optim.make_optimizer" in BLOCKS[3]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    namespace = {"__name__": f"readme_agc_example_{index}"}
    exec(compile(BLOCKS[index], f"README.md[AGC example {index}]", "exec"), namespace)
    # Every example builds an optimizer state holding AGC statistics in [0, 1].
    state = agc.find_state(namespace["opt_state"] if "opt_state" in namespace
                           else namespace["state"])
    fraction = state.clipped_fraction
    assert fraction.shape == () and fraction.dtype == np.float32
    if not isinstance(fraction, jax.ShapeDtypeStruct):  # the last example only traces shapes
        assert 0.0 <= float(fraction) <= 1.0
