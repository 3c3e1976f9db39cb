"""The NFNet trainer: small pure functions and `train_and_evaluate(config, workdir)`.

One command trains on one CPU, on all GPUs or TPU cores of a machine, or on a multi-host pod
(see scripts/train.py). Data parallelism is `jax.pmap` over local devices with gradients
averaged over every device of every host (all pmap plumbing is in `nfnets_jax.parallel`).

The recipe (REFERENCE §4): bfloat16 compute with float32 master weights (a `jmp` policy),
label smoothing after mixing, per-device RNG streams for dropout and stochastic depth, AGC ->
weight decay -> Nesterov SGD on the averaged float32 gradient (`nfnets_jax.optim`), optional
SAM (`optax.contrib.sam`), an EMA of the parameters with decay min(0.99999, (1+t)/(10+t)),
and evaluation of both raw and EMA weights on the whole eval split.

Runs always resume from the newest checkpoint in the workdir, after checking that the new
config keeps the model and optimizer state of the saved one (`ConfigMismatchError` otherwise);
SIGTERM saves a checkpoint and exits cleanly; a non-finite loss stops the run with
`NonFiniteLossError`, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections
import numpy as np
import optax

from nfnets_jax import agc, checkpointing, configlib, evaluation, nfnet, optim, parallel
from nfnets_jax import metrics as metrics_lib

LR_BASE_BATCH_SIZE = 256
NON_FINITE_MESSAGE = "Non-finite loss"
CONFIG_RECORD = "config.json"


class NonFiniteLossError(FloatingPointError):
    """Raised when training produces a non-finite loss or gradient."""


class ConfigMismatchError(ValueError):
    """Raised when resuming a workdir with a config that changes the model or optimizer state."""


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (and checkpoints)."""

    step: jax.Array  # int32 scalar: number of updates applied.
    params: hk.Params  # float32 master weights.
    ema_params: hk.Params
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data; per-step, per-device keys are folded from it.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Values derived from the config and the dataset, computed once in `make_plan`."""

    num_classes: int
    num_train_examples: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    peak_learning_rate: float
    per_device_batch_size: int
    train_image_size: int
    eval_image_size: int
    randaug_layers: int
    randaug_magnitude: int


# ------------------------------------------------------------------------------------------
# Model, plan and optimizer.
# ------------------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no data and no compilation: the model name and variant.

    Raises:
      ValueError: naming the valid model names or variants.
    """
    configlib.check_variant(config.model_name, config.model.variant)


def variant_defaults(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Image sizes and RandAugment settings of the configured model variant.

    NFNet variants take theirs from `nfnet.VARIANTS`; NF-ResNets use 224 px for training
    and testing and RandAugment off, as in their paper.

    Raises:
      ValueError: for an unknown model name or variant (see `validate_config`).
    """
    validate_config(config)
    if config.model_name == "NFNet":
        info = nfnet.VARIANTS[config.model.variant]
        return dict(
            train_imsize=info["train_imsize"],
            test_imsize=info["test_imsize"],
            randaug_layers=info["randaug_layers"],
            randaug_magnitude=info["randaug_magnitude"],
        )
    if config.model_name == "NFResNet":
        return dict(train_imsize=224, test_imsize=224, randaug_layers=0, randaug_magnitude=0)
    raise ValueError(f"Unknown model_name {config.model_name!r}; valid: NFNet, NFResNet.")


def make_plan(config: ml_collections.ConfigDict, num_classes: int, num_train_examples: int) -> Plan:
    """Derives steps, learning rate, batch split and image sizes from the config.

    Args:
      config: the training config.
      num_classes: classes of the dataset.
      num_train_examples: training examples per epoch (`config.num_train_examples` wins when
        it is > 0).

    Returns:
      The plan.

    Raises:
      ValueError: if the batch does not divide by the device count, or the run is empty.
    """
    per_device = parallel.per_device_batch_size(config.batch_size)
    parallel.per_device_batch_size(config.eval_batch_size)
    examples = config.num_train_examples or num_train_examples
    steps_per_epoch = examples / config.batch_size
    if config.num_train_steps > 0:
        total_steps = int(config.num_train_steps)
    else:
        total_steps = int(config.num_epochs * steps_per_epoch)
    if total_steps <= 0:
        raise ValueError(
            f"The run has no steps (num_epochs={config.num_epochs}, "
            f"num_train_steps={config.num_train_steps})."
        )
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    defaults = variant_defaults(config)
    augment = config.augment
    return Plan(
        num_classes=num_classes,
        num_train_examples=examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=max(warmup_steps, 0),
        peak_learning_rate=config.base_learning_rate * config.batch_size / LR_BASE_BATCH_SIZE,
        per_device_batch_size=per_device,
        train_image_size=config.train_image_size or defaults["train_imsize"],
        eval_image_size=config.eval_image_size or defaults["test_imsize"],
        randaug_layers=(
            defaults["randaug_layers"] if augment.randaug_layers < 0 else augment.randaug_layers
        ),
        randaug_magnitude=(
            defaults["randaug_magnitude"]
            if augment.randaug_magnitude < 0
            else augment.randaug_magnitude
        ),
    )


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Constructor arguments of the model: `config.model` without the unset (None) fields."""
    kwargs = {k: v for k, v in config.model.to_dict().items() if v is not None}
    for key in ("depths", "widths"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> hk.Transformed:
    """The configured network as a Haiku transform: `apply(params, rng, images, is_training)`."""
    kwargs = model_kwargs(config)

    def forward(images: jax.Array, is_training: bool) -> dict[str, jax.Array]:
        if config.model_name == "NFNet":
            net = nfnet.NFNet(num_classes=num_classes, **kwargs)
        elif config.model_name == "NFResNet":
            from nfnets_jax import nfresnet  # Only NF-ResNet configs need it.

            net = nfresnet.NFResNet(num_classes=num_classes, **kwargs)
        else:
            raise ValueError(f"Unknown model_name {config.model_name!r}; valid: NFNet, NFResNet.")
        return net(images, is_training=is_training)

    return hk.transform(forward)


def make_schedule(plan: Plan) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then cosine decay to 0 at the last step."""
    return optim.warmup_cosine_schedule(
        plan.peak_learning_rate, plan.warmup_steps, plan.total_steps
    )


def make_optimizer(config: ml_collections.ConfigDict, plan: Plan) -> optax.GradientTransformation:
    """AGC -> weight decay -> Nesterov SGD, wrapped in SAM when `config.sam.enabled`.

    SAM runs in optax's opaque mode: one call to `update` takes the adversarial step (a
    normalised gradient ascent step of size `rho`, with the gradient averaged over all
    devices) and then the outer optimizer's step, so one trainer step is one SAM update.
    """
    base = optim.make_optimizer(
        learning_rate=make_schedule(plan),
        clipping=config.clipping or None,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    # optim's default AGC mask (agc.nfnet_mask) clips everything but the classifier weight.
    if not config.sam.enabled:
        return base
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam.rho))
    return optax.contrib.sam(
        base, adversary, sync_period=2, opaque_mode=True, batch_axis_name=parallel.AXIS_NAME
    )


def precision_policy(config: ml_collections.ConfigDict) -> jmp.Policy:
    """float32 params, `config.dtype` compute, float32 outputs (logits for the loss)."""
    dtype = jnp.dtype(config.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}.")
    return jmp.Policy(param_dtype=jnp.float32, compute_dtype=dtype, output_dtype=jnp.float32)


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


# ------------------------------------------------------------------------------------------
# Loss, train step, eval step (pure; `pmap`ed by the caller).
# ------------------------------------------------------------------------------------------


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
    """One data-parallel update; call under `parallel.pmap`.

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
    base_key = jax.random.wrap_key_data(state.rng)
    rng = jax.random.fold_in(jax.random.fold_in(base_key, state.step), parallel.device_index())
    images, labels = batch["images"], batch["labels"]
    loss_and_grad = jax.value_and_grad(
        functools.partial(loss_fn, model=model, policy=policy, label_smoothing=label_smoothing),
        has_aux=True,
    )
    (loss, logits), grads = loss_and_grad(state.params, rng, images, labels)
    # The update must see the gradient of the global batch: average over every device.
    grads = parallel.pmean(grads)
    if use_sam:

        def adversarial_grad(params: hk.Params, index: int) -> hk.Params:
            step_rng = jax.random.fold_in(rng, index + 1)
            return jax.grad(
                lambda p: loss_fn(
                    p,
                    step_rng,
                    images,
                    labels,
                    model=model,
                    policy=policy,
                    label_smoothing=label_smoothing,
                )[0]
            )(params)

        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, grad_fn=adversarial_grad
        )
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, max_ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
    metrics = {"loss": loss, "accuracy": accuracy}
    metrics = parallel.pmean(metrics)
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


def eval_step(
    params: hk.Params, batch: Mapping[str, jax.Array], *, model: hk.Transformed, policy: jmp.Policy
) -> dict[str, jax.Array]:
    """Sums of loss, top-1 and top-5 hits and example count over the valid examples.

    Call under `parallel.pmap`; the sums cover every device. Padding examples (mask 0) count
    for nothing, so summing over an epoch of padded batches counts each example once.
    """
    outputs = model.apply(
        policy.cast_to_compute(params), None, policy.cast_to_compute(batch["images"]), False
    )
    logits = policy.cast_to_output(outputs["logits"])
    sums = evaluation.batch_counts(logits, batch["labels"].astype(jnp.int32), batch["mask"])
    return parallel.psum(sums)


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------


def data_dir(config: ml_collections.ConfigDict) -> str | None:
    """The configured data directory, None for the dataset's default."""
    return config.data_dir or None


def augment_options(config: ml_collections.ConfigDict, plan: Plan) -> Any:
    """The pipeline's `augment` argument (a `pipeline.AugmentConfig`) for this config."""
    from nfnets_jax.data import pipeline

    if not config.augment.enabled:
        return None
    return pipeline.AugmentConfig(
        random_crop=config.augment.random_crop,
        flip=config.augment.flip,
        randaugment_layers=plan.randaug_layers,
        randaugment_magnitude=float(plan.randaug_magnitude),
        mixup_alpha=config.augment.mixup_alpha,
        cutmix=config.augment.cutmix,
    )


def input_dtype(config: ml_collections.ConfigDict) -> str:
    """Image dtype the pipeline produces: bfloat16 when computing in it (halves transfers)."""
    return "bfloat16" if jnp.dtype(config.dtype) == jnp.bfloat16 else "float32"


def make_train_iterator(
    config: ml_collections.ConfigDict,
    plan: Plan,
    start_step: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's shard of the training batches, from `start_step` on.

    The layout arguments default to this process's; pass them to see another process's data.
    """
    from nfnets_jax.data import pipeline

    return pipeline.train_iterator(
        config.dataset,
        data_dir=data_dir(config),
        global_batch_size=config.batch_size,
        image_size=plan.train_image_size,
        dtype=input_dtype(config),
        augment=augment_options(config, plan),
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        local_device_count=(
            jax.local_device_count() if local_device_count is None else local_device_count
        ),
    )


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    plan: Plan,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of the eval split, padded and masked."""
    from nfnets_jax.data import pipeline

    return pipeline.eval_iterator(
        config.dataset,
        data_dir=data_dir(config),
        split=config.eval_split or None,
        global_batch_size=config.eval_batch_size,
        image_size=plan.eval_image_size,
        dtype=input_dtype(config),
    )


def dataset_info(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(num_classes, num_train_examples) of the configured dataset.

    Also checks, at start-up, that the train and eval splits exist (a missing split raises
    a ValueError naming the dataset, the split and the available splits).
    """
    from nfnets_jax.data import pipeline

    info = pipeline.dataset_info(
        config.dataset, data_dir(config), eval_split=config.eval_split or None
    )
    return info.num_classes, info.num_train


def evaluate(
    p_eval: Callable[..., Any], params: hk.Params, batches: Iterator[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Top-1, top-5 (as fractions) and mean loss of replicated `params` over `batches`."""
    totals = None
    for batch in batches:
        sums = p_eval(params, parallel.shard(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The eval split is empty.")
    totals = jax.tree.map(float, parallel.unreplicate(totals))
    count = max(totals["count"], 1.0)
    return {
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": totals["count"],
    }


# ------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------


class _StopRequest:
    """Turns SIGTERM into a flag the loop polls (only in the main thread)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: no handler, the flag stays False.
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def config_record(config: ml_collections.ConfigDict, plan: Plan) -> dict[str, Any]:
    """What `config.json` holds: the resolved config, the derived plan and the device layout,
    in JSON form (tuples become lists), as written and as read back."""
    record = {
        "config": config.to_dict(),
        "plan": dataclasses.asdict(plan),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    return json.loads(json.dumps(record, default=str))


def check_resume_config(
    workdir: str,
    record: Mapping[str, Any],
    checkpoint_step: int | None,
    allow_config_change: bool = False,
) -> None:
    """Compares the workdir's `config.json` with a resuming run's record; writes nothing.

    Call it before anything in the workdir is overwritten. Changes that keep the model and
    the optimizer state structure (logging and eval frequency, more steps, data_dir,
    learning rate...) are logged; the others (`configlib.resume_changes`) raise.

    Args:
      workdir: the run's working directory.
      record: `config_record` of the new run.
      checkpoint_step: the newest checkpoint in the workdir; None: nothing to resume, no check.
      allow_config_change: log incompatible changes instead of raising (the restore still
        fails if parameter or optimizer state shapes differ).

    Raises:
      ConfigMismatchError: naming each incompatible field with its saved and new values.
    """
    if checkpoint_step is None:
        return
    path = os.path.join(workdir, CONFIG_RECORD)
    try:
        saved = checkpointing.read_json(path)
    except ValueError as e:  # Not JSON: written by something else, or before writes were atomic.
        logging.warning("Cannot read %s (%s).", path, e)
        saved = None
    if saved is None:
        logging.warning(
            "No readable %s next to checkpoint %d: the config cannot be compared; "
            "the restore still checks array shapes.",
            path,
            checkpoint_step,
        )
        return
    incompatible, harmless = configlib.resume_changes(saved, record)
    if harmless:
        logging.warning(
            "Resuming checkpoint %d with changed settings: %s.",
            checkpoint_step,
            "; ".join(harmless),
        )
    if not incompatible:
        return
    details = "\n  ".join(incompatible)
    if allow_config_change:
        logging.warning(
            "allow_config_change: resuming checkpoint %d although the model or "
            "optimizer config changed:\n  %s",
            checkpoint_step,
            details,
        )
        return
    raise ConfigMismatchError(
        f"{workdir} holds checkpoint {checkpoint_step} of a run whose config differs in fields "
        f"that change the model or the optimizer state (saved -> new):\n  {details}\n"
        "Resuming would restore incompatible state. Use a new --workdir to start a new run, "
        f"or the saved values (in {path}) to resume this one; --allow_config_change "
        "(allow_config_change=True) resumes anyway, if parameter and optimizer state shapes "
        "still match."
    )


def restore_or_create(
    config: ml_collections.ConfigDict,
    checkpointer: checkpointing.Checkpointer,
    model: hk.Transformed,
    optimizer: optax.GradientTransformation,
    plan: Plan,
) -> TrainState:
    """The newest checkpoint in the workdir, else a fresh state (from `init_checkpoint`)."""
    state = create_train_state(model, optimizer, plan.train_image_size, config.seed)
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(state._asdict())
        logging.info("Resuming from step %d in %s.", int(restored["step"]), checkpointer.directory)
        return TrainState(**restored)
    if config.init_checkpoint:
        params = load_pretrained(config.init_checkpoint, state.params)
        state = TrainState(
            step=state.step,
            params=params,
            ema_params=params,
            opt_state=jax.device_get(jax.jit(optimizer.init)(params)),
            rng=state.rng,
        )
    return state


def load_pretrained(path: str, fresh_params: hk.Params) -> hk.Params:
    """Released weights for fine-tuning, with freshly initialised classifier if shapes differ.

    Args:
      path: a released parameter file (or a zoo name the checkpoint module resolves).
      fresh_params: the initialised params of the model being trained.

    Returns:
      `fresh_params` with every parameter whose path and shape match taken from the file.

    Raises:
      ValueError: if a non-classifier parameter is missing or has another shape.
    """
    from nfnets_jax.checkpoints import released  # Only fine-tuning needs it.

    loaded = released.load_params(path)
    params = {}
    for module, values in fresh_params.items():
        params[module] = {}
        for name, fresh in values.items():
            source = loaded.get(module, {}).get(name)
            is_classifier = re.fullmatch(agc.NFNET_CLASSIFIER_PATTERN, f"{module}/w") is not None
            if source is not None and np.shape(source) == np.shape(fresh):
                params[module][name] = np.asarray(source, np.float32)
            elif is_classifier:
                params[module][name] = fresh  # A new head for a new label set.
            else:
                raise ValueError(
                    f"Pretrained checkpoint {path} has no parameter {module}/{name} of shape "
                    f"{np.shape(fresh)} (found {None if source is None else np.shape(source)})."
                )
    return params


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step_hook: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains and evaluates a model; resumes from the newest checkpoint in `workdir`.

    Before anything is written, the config is validated (`validate_config`) and, when the
    workdir holds a checkpoint, compared with the saved `config.json`
    (`check_resume_config`); `config.json` is then rewritten atomically.

    Args:
      config: the training config (see configs/default.py).
      workdir: where checkpoints, TensorBoard events and metrics.jsonl go.
      step_hook: called with the step number before each step (for tests and tooling).
      allow_config_change: resume even if the config changes the model or optimizer
        (see `check_resume_config`).

    Returns:
      {"step", "train": last train metrics, "eval": raw-weight eval metrics,
       "eval_ema": EMA eval metrics (if `config.eval_ema`), "state": host TrainState,
       "preempted": whether the run stopped on SIGTERM}.

    Raises:
      NonFiniteLossError: if a step produced a non-finite loss or gradient.
      ConfigMismatchError: if the workdir's checkpoint was written with a config that had
        another model or optimizer state structure.
      ValueError: if `workdir` is a URL (gs://...): not supported yet; for an unknown model
        name or variant.
    """
    if "://" in workdir:
        # os.path would turn "gs://b/x" into a local "./gs:/b/x": checkpoints that vanish
        # with the VM. Refuse rather than lose a run.
        raise ValueError(
            f"workdir {workdir!r} is a URL; cloud storage workdirs are not "
            "supported yet. Use a local or shared POSIX path (e.g. a mounted "
            "bucket or NFS) visible to every host."
        )
    validate_config(config)
    num_classes, num_train_examples = dataset_info(config)
    plan = make_plan(config, num_classes, num_train_examples)
    model = build_model(config, plan.num_classes)
    optimizer = make_optimizer(config, plan)
    schedule = make_schedule(plan)
    policy = precision_policy(config)
    checkpointer = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
    record = config_record(config, plan)
    try:  # Every process checks (same files, same verdict); process 0 then writes.
        check_resume_config(workdir, record, checkpointer.latest_step(), allow_config_change)
    except BaseException:
        checkpointer.close()
        raise
    writer = metrics_lib.MetricWriter(workdir)
    if jax.process_index() == 0:
        checkpointing.write_json_atomic(os.path.join(workdir, CONFIG_RECORD), record)
    host_state = restore_or_create(config, checkpointer, model, optimizer, plan)
    step = int(host_state.step)
    state = parallel.replicate(host_state)
    del host_state

    p_train = parallel.pmap(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            policy=policy,
            label_smoothing=config.label_smoothing,
            max_ema_decay=config.ema_decay,
            use_sam=config.sam.enabled,
        ),
        donate_argnums=(0,),
    )
    p_eval = parallel.pmap(functools.partial(eval_step, model=model, policy=policy))

    def run_eval() -> dict[str, dict[str, float]]:
        results = {"eval": evaluate(p_eval, state.params, make_eval_iterator(config, plan))}
        if config.eval_ema:
            results["eval_ema"] = evaluate(
                p_eval, state.ema_params, make_eval_iterator(config, plan)
            )
        for split, values in results.items():
            writer.write(step, split, values)
            if jax.process_index() == 0:
                logging.info(
                    "%s at step %d: top-1 %.4f, top-5 %.4f, loss %.4f",
                    split,
                    step,
                    values["top1"],
                    values["top5"],
                    values["loss"],
                )
        writer.flush()
        return results

    def save() -> None:
        checkpointer.save(step, jax.device_get(parallel.unreplicate(state)))

    progress = metrics_lib.Progress(plan.total_steps, config.batch_size, start_step=step)
    logging.info(
        "Training %d steps (%.1f epochs of %d examples) at global batch %d on %d "
        "devices (%d processes); peak lr %.4g, warmup %d steps.",
        plan.total_steps,
        plan.total_steps / plan.steps_per_epoch,
        plan.num_train_examples,
        config.batch_size,
        jax.device_count(),
        jax.process_count(),
        plan.peak_learning_rate,
        plan.warmup_steps,
    )
    train_batches = make_train_iterator(config, plan, start_step=step)
    ckpt_every = config.checkpoint_every_steps
    log = {"train": {}, "interval": [], "step": step, "preempted": False}
    results: dict[str, Any] = {}
    pending = None  # (step, device metrics) of the newest step, read one step late.

    def consume(entry: tuple[int, Any]) -> None:
        done_step, device_metrics = entry
        values = _host_metrics(device_metrics)
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise NonFiniteLossError(
                f"{NON_FINITE_MESSAGE} ({values['loss']}, gradient norm {values['grad_norm']}) "
                f"at step {done_step}: stopping. The last good checkpoint is step "
                f"{checkpointer.latest_step()} in {checkpointer.directory}; lower the learning "
                "rate or check the data before resuming."
            )
        if not log["interval"] and not log["train"]:
            progress.restart(done_step)  # Throughput and ETA leave the compilation out.
        log["train"], log["step"] = values, done_step
        log["interval"].append(values)
        log["preempted"] = log["preempted"] or values["stop_requests"] > 0

    try:
        with _StopRequest() as stop:
            while step < plan.total_steps:
                if step_hook is not None:
                    step_hook(step)
                batch = parallel.shard(next(train_batches))
                request = parallel.per_device_value(int(stop.requested))
                state, device_metrics = p_train(state, batch, request)
                step += 1
                if pending is not None:
                    consume(pending)
                pending = (step, device_metrics)
                is_last = step == plan.total_steps
                save_now = (
                    is_last or log["preempted"] or bool(ckpt_every and step % ckpt_every == 0)
                )
                if save_now:  # Read this step's metrics: never save a state after a NaN.
                    consume(pending)
                    pending = None
                interval = log["interval"]
                if interval and (save_now or log["step"] % config.log_every_steps == 0):
                    means = {k: float(np.mean([m[k] for m in interval])) for k in interval[0]}
                    writer.write(log["step"], "train", means)
                    progress.update(log["step"], means["loss"], means["learning_rate"])
                    log["interval"] = []
                if save_now:
                    save()
                if log["preempted"]:
                    logging.warning(
                        "Stopped at step %d on request; checkpoint saved in %s.",
                        step,
                        checkpointer.directory,
                    )
                    break
                if not is_last and config.eval_every_steps and step % config.eval_every_steps == 0:
                    results.update(run_eval())
            if not log["preempted"] and (step == plan.total_steps):
                results.update(run_eval())
    finally:
        writer.close()
        checkpointer.close()
    identical = parallel.replicas_identical(state)
    if not identical:
        logging.error("Replicas diverged: the local copies of the training state differ.")
    results.update(
        step=step,
        train=log["train"],
        preempted=log["preempted"],
        replicas_identical=identical,
        state=jax.device_get(parallel.unreplicate(state)),
    )
    return results
