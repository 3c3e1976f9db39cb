"""Tests for nfnets_jax.optim: parameter groups, the optimizer chain and the schedule."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets_jax import agc, optim, treepaths
from nfnets_jax.models import nfnet

CLASSIFIER_W = "NFNet/~/linear/w"


@functools.cache
def f0_shapes():
    forward = hk.transform(lambda x: nfnet.NFNet(variant="F0")(x, is_training=True))
    return jax.eval_shape(
        lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    )


def expected_group(path: str, ndim: int) -> str:
    """Reference groups from the recipe, decided by shape rather than by name.

    Kernels (ndim >= 2) get weight decay, gains / biases / skip gains (ndim <= 1) do not;
    everything but the classifier weight is clipped.
    """
    decay = ndim >= 2
    if path == CLASSIFIER_W:
        assert decay
        return "decay_only"
    return "clip+decay" if decay else "clip_only"


def test_param_groups_for_every_f0_leaf():
    shapes = f0_shapes()
    labels = optim.param_groups(shapes)
    paths = treepaths.param_paths(shapes)
    assert len(paths) == 233
    for path, leaf, label in zip(
        paths, jax.tree.leaves(shapes), jax.tree.leaves(labels), strict=True
    ):
        assert label == expected_group(path, leaf.ndim), path
    by_path = dict(zip(paths, jax.tree.leaves(labels), strict=True))
    assert by_path[CLASSIFIER_W] == "decay_only"
    assert by_path["NFNet/~/linear/b"] == "clip_only"
    assert by_path["NFNet/~/nf_block/skip_gain"] == "clip_only"
    assert by_path["NFNet/~/nf_block/~/squeeze_excite/~/linear/w"] == "clip+decay"
    assert by_path["NFNet/~/nf_block/~/squeeze_excite/~/linear_1/b"] == "clip_only"
    assert by_path["NFNet/~/stem_conv0/gain"] == "clip_only"
    counts = {g: list(jax.tree.leaves(labels)).count(g) for g in optim.GROUP_LABELS}
    # 12 blocks: 4 stem + 12*4 block convs + 4 shortcuts + final conv = 57 conv kernels,
    # 24 SE kernels; 1 classifier weight; the rest are gains, biases and skip gains.
    assert counts == {"clip+decay": 57 + 24, "decay_only": 1, "clip_only": 151, "none": 0}


def test_default_decay_mask_rejects_unknown_names():
    params = {"NFNet/~/stem_conv0": {"w": np.ones((3, 3, 3, 4)), "scale": np.ones(4)}}
    with pytest.raises(ValueError, match=r"unknown parameter name 'scale'.*stem_conv0/scale"):
        optim.default_decay_mask(params)


def small_nfnet_params(seed=0):
    """A small tree with every kind of leaf the real models have, under the real names."""
    rng = np.random.default_rng(seed)
    leaf = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {
        "NFNet/~/stem_conv0": {"w": leaf(3, 3, 3, 4), "gain": leaf(4), "bias": leaf(4)},
        "NFNet/~/nf_block": {"skip_gain": leaf()},
        "NFNet/~/nf_block/~/conv0": {"w": leaf(1, 1, 4, 8), "gain": leaf(8), "bias": leaf(8)},
        "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": leaf(8, 4), "b": leaf(4)},
        "NFNet/~/nf_block/~/squeeze_excite/~/linear_1": {"w": leaf(4, 8), "b": leaf(8)},
        "NFNet/~/linear": {"w": leaf(8, 10), "b": leaf(10)},
    }


def np_unit_norms(x):
    """Float64 L2 norm of each output unit (keepdims), independently of nfnets_jax.agc.

    Units are along the last axis (Haiku HWIO / (in, out) kernels): every other axis is
    reduced. Scalars and vectors (gains, biases, skip gains) form a single unit.
    """
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1)) if x.ndim > 1 else None
    return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def test_optimizer_applies_decay_and_clipping_to_the_labelled_groups():
    params = small_nfnet_params()
    labels = dict(
        zip(treepaths.param_paths(params), jax.tree.leaves(optim.param_groups(params)), strict=True)
    )
    paths = treepaths.param_paths(params)
    # Zero gradient, lr 1, no momentum: the update is -weight_decay * w exactly where decayed.
    tx = optim.make_optimizer(1.0, clipping=0.01, weight_decay=0.5, momentum=None)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, u, w in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        expected = -0.5 * w if "decay" in labels[path] else np.zeros_like(w)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, err_msg=path)
    # Huge gradient, no decay: clipped leaves are bounded, the classifier weight is not.
    tx = optim.make_optimizer(1.0, clipping=0.01, weight_decay=0.0, momentum=None)
    huge = jax.tree.map(lambda x: np.full_like(x, 100.0), params)
    updates, state = jax.jit(tx.update)(huge, tx.init(params), params)
    for path, u, w in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        u = np.asarray(u)
        if labels[path].startswith("clip"):
            # Every unit is over the bound: each is rescaled to exactly 0.01 * max(||W||, eps)
            # (lr 1: the update is minus the clipped gradient), keeping its direction.
            bound = 0.01 * np.maximum(np_unit_norms(w), 1e-3)
            np.testing.assert_allclose(np_unit_norms(u), bound, rtol=1e-5, err_msg=path)
            g = np.full_like(w, 100.0)
            np.testing.assert_allclose(u, -g * bound / np_unit_norms(g), rtol=1e-5, err_msg=path)
        else:
            np.testing.assert_array_equal(u, -100.0, err_msg=path)
    assert float(agc.clipped_fraction(state)) == 1.0


def test_chain_matches_manual_reference_update():
    params = small_nfnet_params(1)
    paths = treepaths.param_paths(params)
    rng = np.random.default_rng(2)
    lr, mu, wd, lam = 0.3, 0.9, 1e-2, 0.05
    tx = optim.make_optimizer(lr, clipping=lam, weight_decay=wd, momentum=mu, nesterov=True)
    state = tx.init(params)
    update = jax.jit(tx.update)
    labels = dict(zip(paths, jax.tree.leaves(optim.param_groups(params)), strict=True))
    momentum = {p: np.zeros_like(w) for p, w in zip(paths, jax.tree.leaves(params), strict=True)}
    for _ in range(3):
        grads = jax.tree.map(
            lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32), params
        )
        updates, state = update(grads, state, params)
        for path, g, w, u in zip(
            paths,
            jax.tree.leaves(grads),
            jax.tree.leaves(params),
            jax.tree.leaves(updates),
            strict=True,
        ):
            g = g.astype(np.float64)
            if labels[path].startswith("clip"):
                g_norm = np_unit_norms(g)
                max_norm = lam * np.maximum(np_unit_norms(w), 1e-3)
                g = np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)
            if "decay" in labels[path]:
                g = g + wd * w
            momentum[path] = mu * momentum[path] + g
            expected = -lr * (g + mu * momentum[path])
            np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-8, err_msg=path)
        params = optax.apply_updates(params, updates)


def test_optimizer_on_f0_groups_under_jit():
    # The default masks must resolve on the real F0 tree (shapes only, no init run).
    shapes = f0_shapes()
    tx = optim.make_optimizer(0.1, track_per_param=True)
    state_shapes = jax.eval_shape(tx.init, shapes)
    per_param = agc.find_state(state_shapes).per_param_clipped_fraction
    assert len(per_param) == 232 and CLASSIFIER_W not in per_param
    updates, _ = jax.eval_shape(tx.update, shapes, state_shapes, shapes)
    assert jax.tree.structure(updates) == jax.tree.structure(shapes)


def test_agc_metrics_and_disabled_agc():
    params = small_nfnet_params()
    tx = optim.make_optimizer(0.1, track_per_param=True)
    grads = jax.tree.map(lambda x: np.full_like(x, 10.0), params)
    _, state = tx.update(grads, tx.init(params), params)
    metrics = optim.agc_metrics(state)
    assert float(metrics["agc_clipped_fraction"]) == 1.0
    assert "agc_clipped_fraction/NFNet/~/stem_conv0/w" in metrics
    assert "agc_clipped_fraction/NFNet/~/linear/w" not in metrics
    no_agc = optim.make_optimizer(0.1, clipping=None)
    state = no_agc.init(params)
    assert optim.agc_metrics(state) == {}
    with pytest.raises(ValueError, match="No adaptive_grad_clip state"):
        agc.clipped_fraction(state)


def test_custom_masks_for_non_haiku_trees():
    params = {
        "params": {
            "Dense_0": {"kernel": np.ones((3, 4), np.float32), "bias": np.ones(4, np.float32)},
            "head": {"kernel": np.ones((4, 2), np.float32)},
        }
    }
    agc_mask = treepaths.exclude_paths("params/head/kernel")
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, x: treepaths.path_to_str(path).endswith("kernel"), p
    )
    labels = optim.param_groups(params, agc_mask=agc_mask, decay_mask=decay_mask)
    assert labels == {
        "params": {
            "Dense_0": {"kernel": "clip+decay", "bias": "clip_only"},
            "head": {"kernel": "decay_only"},
        }
    }
    tx = optim.make_optimizer(0.1, agc_mask=agc_mask, decay_mask=decay_mask)
    updates, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="unknown parameter name 'kernel'"):
        optim.make_optimizer(0.1, agc_mask=agc_mask).init(params)


def test_warmup_cosine_schedule():
    base, warmup, total = 1.6, 10, 50
    schedule = optim.warmup_cosine_schedule(base, warmup, total)
    for step in [0, 1, 5, 9, 10, 11, 30, 49, 50, 60]:
        if step < warmup:
            expected = base * step / warmup
        else:
            t = min(step - warmup, total - warmup) / (total - warmup)
            expected = 0.5 * base * (1 + math.cos(math.pi * t))
        np.testing.assert_allclose(
            float(schedule(step)), expected, rtol=1e-5, atol=1e-7, err_msg=str(step)
        )
    no_warmup = optim.warmup_cosine_schedule(1.0, 0, 4)
    np.testing.assert_allclose(
        [float(no_warmup(s)) for s in range(5)],
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="0 <= warmup_steps < total_steps"):
        optim.warmup_cosine_schedule(1.0, 10, 10)
    assert optim.scaled_learning_rate(4096) == pytest.approx(1.6)
    assert optim.scaled_learning_rate(256) == pytest.approx(0.1)


def test_schedule_drives_the_optimizer_step_count():
    params = {"NFNet/~/linear": {"w": np.ones((2, 2), np.float32)}}
    schedule = optim.warmup_cosine_schedule(1.0, 2, 10)
    tx = optim.make_optimizer(schedule, clipping=None, weight_decay=0.0, momentum=None)
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    seen = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        seen.append(-float(updates["NFNet/~/linear"]["w"][0, 0]))
    np.testing.assert_allclose(seen, [0.0, 0.5, 1.0], atol=1e-6)
