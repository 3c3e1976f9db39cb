"""Shared by the tests: the tiny digits config (configs/tiny.py) with overrides, an exact
comparison of training states, and a script's main run in-process."""

import importlib.util
import os

import jax
import numpy as np
from absl import flags

from nfnets_jax import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny_config(**overrides):
    """configs/tiny.py with `overrides` (dotted keys for nested fields: "model.width"), locked."""
    config = configlib.load_config_file(TINY)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    config.lock()
    return config


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    """Same structure and values (exactly, by default), naming the first differing leaf."""
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def run_script(name, argv):
    """Runs scripts/<name>.py's main as `python scripts/<name>.py *argv` would, in-process.

    Flags (`--x=y`) and positional arguments may come in any order; the script's absl flags
    are removed again afterwards. Returns the exit status (0 when main returns).
    """
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    before, was_parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
    spec.loader.exec_module(module)
    try:
        flags.FLAGS([f"{name}.py", *[a for a in argv if a.startswith("--")]])
        module.main([f"{name}.py", *[a for a in argv if not a.startswith("--")]])
        return 0
    except SystemExit as e:
        return e.code
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        if not was_parsed:
            flags.FLAGS.unparse_flags()
