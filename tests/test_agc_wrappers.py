"""AGC inside other people's code: optax wrappers (inject_hyperparams, MultiSteps), vmap,
shard_map, and Flax NNX's optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from agc_reference import np_agc_leaf

from nfnets_jax import agc, treepaths

# ----------------------------------------------------------------------------- wrappers


def test_inject_hyperparams_with_a_mask_function():
    params = {"body": jnp.ones((4, 3)), "head": jnp.ones((3, 2))}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
    mask = treepaths.exclude_paths("head")
    # Without static_args, inject_hyperparams calls the mask as a schedule: a clear error.
    plain = optax.inject_hyperparams(agc.adaptive_grad_clip)(clipping=0.01, mask=mask)
    with pytest.raises(TypeError, match=r"static_args=\('mask', 'unit_axis'\)"):
        plain.init(params)
    # A hand-written mask function is called with the step count, and so is refused.
    lam = optax.inject_hyperparams(agc.adaptive_grad_clip, static_args=("unit_axis",))(
        clipping=0.01, mask=lambda p: p
    )
    with pytest.raises(ValueError, match=r"mask is a scalar integer JAX array.*static_args"):
        lam.init(params)
    # So is an int unit axis (inject_hyperparams makes it an array).
    axis = optax.inject_hyperparams(agc.adaptive_grad_clip)(clipping=0.01)
    with pytest.raises(ValueError, match=r"unit_axis is a scalar integer JAX array.*static_args"):
        axis.init(params)
    # With it, the mask is honoured and the threshold is a schedule.
    tx = optax.inject_hyperparams(agc.adaptive_grad_clip, static_args=("mask", "unit_axis"))(
        clipping=lambda count: 0.01 * (count + 1), mask=mask
    )
    state = tx.init(params)
    for step in range(2):
        out, state = jax.jit(tx.update)(grads, state, params)
        np.testing.assert_array_equal(np.asarray(out["head"]), 10.0)
        bound = 0.01 * (step + 1) * 2.0  # ||W_i|| = 2 for the 4x3 kernel of ones
        np.testing.assert_allclose(np.asarray(agc.unitwise_norm(out["body"])), bound, rtol=1e-6)


# ----------------------------------------------------------------------------- Flax NNX


def test_flax_nnx_optimizer_uses_linen_style_paths_at_init_and_update():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tx = agc.adaptive_grad_clip(
        0.01, mask=treepaths.exclude_paths("head/kernel"), track_per_param=True
    )
    optimizer = nnx.Optimizer(model, optax.chain(tx, optax.scale(-1.0)), wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 15).reshape(5, 3)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    paths = {"hidden/bias", "hidden/kernel", "head/bias"}  # The same keys as at init.
    assert set(agc.per_param_clipped_fraction(optimizer.opt_state)) == paths
    # The update applied is exactly the clipped gradient (the NumPy rule), head/kernel as is.
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    g = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
    for layer in ("hidden", "head"):
        for name in ("kernel", "bias"):
            step = before[layer][name] - after[layer][name]
            if (layer, name) == ("head", "kernel"):
                expected = g[layer][name]
            else:
                expected = np_agc_leaf(g[layer][name], before[layer][name], 0.01)
            np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-7, err_msg=layer)
    assert 0 < float(agc.clipped_fraction(optimizer.opt_state)) <= 1
    # Called by hand on Variable trees, the update comes back as Variables.
    params = nnx.state(model, nnx.Param)
    out, _ = tx.update(grads, tx.init(params), params)
    assert jax.tree.structure(out) == jax.tree.structure(grads)


def test_multisteps_vmap_and_shard_map_take_the_transform_as_is():
    rng = np.random.default_rng(7)
    params = {"k": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    grads = {"k": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    expected = np_agc_leaf(grads["k"], params["k"], 0.05)
    # MultiSteps: the clipped mean of two equal micro-batch gradients is the clipped gradient.
    multi = optax.MultiSteps(agc.adaptive_grad_clip(0.05), every_k_schedule=2)
    state = multi.init(params)
    first, state = multi.update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(first["k"]), 0.0)  # accumulating
    second, state = multi.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(second["k"]), expected, rtol=1e-6)
    # vmap over a batch of independent (grads, params) pairs.
    tx = agc.adaptive_grad_clip(0.05)
    batched = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), (grads, params))
    out, _ = jax.vmap(lambda g, p: tx.update(g, tx.init(p), p))(*batched)
    np.testing.assert_allclose(np.asarray(out["k"][0]), expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["k"][1]), np_agc_leaf(2 * grads["k"], 2 * params["k"], 0.05), rtol=1e-6
    )
    # shard_map over 8 devices: each averages the gradient over the mesh, then clips.
    mesh = jax.make_mesh((8,), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    per_device = jnp.broadcast_to(grads["k"], (8, 4, 3)) * jnp.arange(1, 9)[:, None, None] / 4.5
    per_device = jax.device_put(per_device, jax.sharding.NamedSharding(mesh, spec))

    def step(g):
        g = jax.lax.pmean(g[0], "d")
        return tx.update({"k": g}, tx.init(params), params)[0]["k"][None]

    sharded = jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec)(per_device)
    np.testing.assert_allclose(np.asarray(sharded)[3], expected, rtol=1e-5)
