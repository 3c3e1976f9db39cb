"""The pure pieces of a training step: state, loss, gradients, train step, eval logits.

Nothing here is `pmap`ed: the loop (and the step benchmark) wrap `train_step` with
`parallel.pmap`, so the collectives (`parallel.pmean`, `parallel.psum`,
`parallel.device_index`) run over every device of every host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import optax

from nfnets_jax import optim, parallel
from nfnets_jax.models import registry


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (and checkpoints)."""

    step: jax.Array  # int32 scalar: number of updates applied.
    params: hk.Params  # float32 master weights.
    ema_params: hk.Params
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data; per-step, per-device keys are folded from it.


def create_train_state(
    model: hk.Transformed, optimizer: optax.GradientTransformation, image_size: int, seed: int
) -> TrainState:
    """Initialises the training state on the host (identical on every process for a seed).

    Args:
      model: the network transform.
      optimizer: the optimizer.
      image_size: training image side, for shape inference.
      seed: the run's seed; the model init key and the base training key derive from it.

    Returns:
      A host (numpy) `TrainState` at step 0 with EMA params equal to the params.
    """
    init_key, train_key = jax.random.split(jax.random.key(seed))
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # Inference mode: the parameters are the same, and the init program does not depend on
    # dropout / stochastic depth rates (one compilation serves configs differing only there).
    params = jax.jit(model.init, static_argnums=2)(init_key, dummy, False)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=jax.jit(optimizer.init)(params),
        rng=jax.random.key_data(train_key),
    )
    return jax.device_get(state)


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """The EMA decay at update `step`: min(max_decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def l2_norm(tree: Any) -> jax.Array:
    """Global l2 norm of a pytree, in float32."""
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def smooth_labels(labels: jax.Array, smoothing: float) -> jax.Array:
    """Label smoothing of (possibly mixed) target distributions."""
    num_classes = labels.shape[-1]
    return labels * (1.0 - smoothing) + smoothing / num_classes


def loss_fn(
    params: hk.Params,
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    model: hk.Transformed,
    policy: jmp.Policy,
    label_smoothing: float,
) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy against smoothed targets, computed in `policy`'s precision.

    Args:
      params: float32 master weights (cast to the compute dtype here, so gradients come
        back in float32).
      rng: key for dropout and stochastic depth.
      images: [batch, H, W, 3] normalised images.
      labels: [batch, num_classes] target distributions (one-hot or mixed), unsmoothed.
      model: the network transform.
      policy: the mixed precision policy.
      label_smoothing: smoothing applied to `labels`.

    Returns:
      (loss, float32 logits).
    """
    outputs = model.apply(policy.cast_to_compute(params), rng, policy.cast_to_compute(images), True)
    logits = policy.cast_to_output(outputs["logits"])
    targets = smooth_labels(labels.astype(jnp.float32), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets)), logits


def step_rng(state: TrainState) -> jax.Array:
    """This step's key on this device: fold_in(fold_in(base, step), global device index).

    Independent of how devices are split into hosts, and reproduced on resume.
    """
    base_key = jax.random.wrap_key_data(state.rng)
    return jax.random.fold_in(jax.random.fold_in(base_key, state.step), parallel.device_index())


def gradients(
    state: TrainState, batch: Mapping[str, jax.Array], loss: Callable[..., Any]
) -> tuple[tuple[jax.Array, jax.Array], hk.Params]:
    """((loss, logits), gradient averaged over every device) of one step's batch."""
    value_and_grad = jax.value_and_grad(loss, has_aux=True)
    out, grads = value_and_grad(state.params, step_rng(state), batch["images"], batch["labels"])
    # The update must see the gradient of the global batch: average over every device.
    return out, parallel.pmean(grads)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    stop_request: jax.Array,
    *,
    model: hk.Transformed,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    policy: jmp.Policy,
    label_smoothing: float,
    max_ema_decay: float,
    use_sam: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One data-parallel update. Call under `parallel.pmap` (see `bind_train_step`).

    Args:
      state: this device's replica of the training state.
      batch: this device's {"images", "labels"} examples.
      stop_request: 1 if this process was asked to stop (SIGTERM), else 0; summed over
        devices so every process sees every request at the same step.
      model, optimizer, schedule, policy, label_smoothing, max_ema_decay, use_sam: the
        static pieces of the recipe (bound with functools.partial).

    Returns:
      The new state and metrics, already averaged over all devices.
    """
    loss = functools.partial(loss_fn, model=model, policy=policy, label_smoothing=label_smoothing)
    (loss_value, logits), grads = gradients(state, batch, loss)
    if use_sam:
        rng, images, labels = step_rng(state), batch["images"], batch["labels"]

        def adversarial_grad(params: hk.Params, index: int) -> hk.Params:
            key = jax.random.fold_in(rng, index + 1)
            return jax.grad(lambda p: loss(p, key, images, labels)[0])(params)

        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, grad_fn=adversarial_grad
        )
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, max_ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    metrics = parallel.pmean({"loss": loss_value, "accuracy": accuracy})
    metrics.update(
        grad_norm=l2_norm(grads),
        param_norm=l2_norm(params),
        update_norm=l2_norm(updates),
        learning_rate=schedule(state.step),
        ema_decay=decay,
        stop_requests=parallel.psum(stop_request),
    )
    metrics.update(optim.agc_metrics(opt_state))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        rng=state.rng,
    )
    return new_state, metrics


def bind_train_step(recipe: Any) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch, stop_request)` with the static pieces of a `Recipe`."""
    return functools.partial(
        train_step,
        model=recipe.model,
        optimizer=recipe.optimizer,
        schedule=recipe.schedule,
        policy=recipe.policy,
        label_smoothing=recipe.label_smoothing,
        max_ema_decay=recipe.max_ema_decay,
        use_sam=recipe.use_sam,
    )


def eval_logits_fn(model: hk.Transformed, policy: jmp.Policy) -> registry.ApplyFn:
    """`apply(params, images) -> float32 logits` in inference mode, in `policy`'s precision.

    For `evaluation.make_eval_step`: the trainer evaluates with the evaluation module's loop.
    """

    def apply(params: hk.Params, images: jax.Array) -> jax.Array:
        outputs = model.apply(
            policy.cast_to_compute(params), None, policy.cast_to_compute(images), False
        )
        return policy.cast_to_output(outputs["logits"])

    return apply
