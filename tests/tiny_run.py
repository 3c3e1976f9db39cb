"""Shared by the trainer tests: the tiny digits config (configs/tiny.py) with overrides, and
an exact comparison of training states."""

import os

import jax
import numpy as np

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
