"""The recipe: a training config read once into a typed `Recipe`.

`build_recipe(config)` validates the config, reads the dataset's size, derives the `Plan`
(steps, peak learning rate, image sizes, RandAugment from the variant) and builds the model,
the learning-rate schedule, the optimizer (AGC -> weight decay -> Nesterov SGD, optionally
SAM), the mixed-precision policy and the input iterators. Nothing after it reads the config
again, except to record it (`resume.config_record`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections
import numpy as np
import optax

from nfnets_jax import optim, parallel
from nfnets_jax.models import registry

# Fields that set how often something happens: 0 = never (logging: only at checkpoints).
PERIOD_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Values derived from the config and the dataset, computed once in `make_plan`."""

    num_classes: int
    num_train_examples: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    peak_learning_rate: float
    train_image_size: int
    eval_image_size: int
    randaug_layers: int
    randaug_magnitude: int


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks that need no data and no compilation: model, variant, periods, batch sizes.

    Raises:
      ValueError: naming the field and what it accepts.
    """
    registry.variant(config.model_name, config.model.variant)
    for field in PERIOD_FIELDS:
        if config[field] < 0:
            raise ValueError(f"{field} must be >= 0 (0 = never), got {config[field]}.")
    if config.keep_checkpoints < 1:
        raise ValueError(
            f"keep_checkpoints must be >= 1 (the newest checkpoints kept), got "
            f"{config.keep_checkpoints}."
        )
    for field in ("batch_size", "eval_batch_size"):
        if config[field] <= 0:
            raise ValueError(f"{field} must be > 0, got {config[field]}.")


def dataset_info(config: ml_collections.ConfigDict) -> Any:
    """The configured dataset's `data.pipeline.DatasetInfo` (classes, split sizes, names).

    Also checks, at start-up, that the train and eval splits exist and are not empty (a
    missing split raises a ValueError naming the dataset, the split and the available
    splits; an empty one names the dataset and the split).
    """
    from nfnets_jax.data import pipeline

    info = pipeline.dataset_info(
        config.dataset, config.data_dir or None, eval_split=config.eval_split or None
    )
    for what, split, count in (
        ("training", "train", info.num_train),
        ("evaluation", info.eval_split, info.num_eval),
    ):
        if count == 0:
            raise ValueError(
                f"The {what} split {split!r} of dataset {config.dataset!r} has no examples "
                "(for a folder dataset: no images with a known extension in its class "
                "folders); fill it, or choose another with --config.eval_split."
            )
    if info.num_classes < 2:
        raise ValueError(
            f"Dataset {config.dataset!r} has {info.num_classes} class(es); a classifier "
            "needs at least 2."
        )
    return info


def make_plan(config: ml_collections.ConfigDict, num_classes: int, num_train_examples: int) -> Plan:
    """Derives steps, learning rate and image sizes from the config and the dataset.

    Args:
      config: the training config.
      num_classes: classes of the dataset.
      num_train_examples: training examples per epoch (`config.num_train_examples` wins when
        it is > 0).

    Returns:
      The plan.

    Raises:
      ValueError: if a batch does not divide by the device count, or the run is empty.
    """
    parallel.per_device_batch_size(config.batch_size)
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
    spec = registry.variant(config.model_name, config.model.variant)
    augment = config.augment
    return Plan(
        num_classes=num_classes,
        num_train_examples=examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=max(warmup_steps, 0),
        peak_learning_rate=optim.scaled_learning_rate(config.batch_size, config.base_learning_rate),
        train_image_size=config.train_image_size or spec.train_px,
        eval_image_size=config.eval_image_size or spec.test_px,
        randaug_layers=(
            spec.randaug_layers if augment.randaug_layers < 0 else augment.randaug_layers
        ),
        randaug_magnitude=(
            spec.randaug_magnitude if augment.randaug_magnitude < 0 else augment.randaug_magnitude
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
    """The configured network: `apply(params, rng, images, is_training)` -> outputs."""
    return registry.build_forward(
        config.model_name, num_classes=num_classes, **model_kwargs(config)
    )


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
        overflow_safe=config.agc_overflow_safe,
    )
    if not config.sam.enabled:
        return base
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam.rho))
    return optax.contrib.sam(
        base, adversary, sync_period=2, opaque_mode=True, batch_axis_name=parallel.AXIS_NAME
    )


def precision_policy(dtype: str) -> jmp.Policy:
    """float32 params, `dtype` compute, float32 outputs (logits for the loss).

    Raises:
      ValueError: for a dtype other than float32, bfloat16 or float16.
    """
    compute = jnp.dtype(dtype)
    if compute not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
    return jmp.Policy(param_dtype=jnp.float32, compute_dtype=compute, output_dtype=jnp.float32)


def augment_options(config: ml_collections.ConfigDict, plan: Plan) -> Any:
    """The pipeline's `augment` argument (a `pipeline.AugmentConfig`), None when disabled."""
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything a run needs, read once from its config (`build_recipe`).

    Attributes:
      config: the config it was built from (kept for the workdir's record only).
      plan: the derived values.
      model, schedule, optimizer, policy: the network, learning rate, optimizer chain and
        mixed-precision policy.
      label_smoothing, max_ema_decay, use_sam: the remaining static pieces of the step.
      batch_size: the global batch, over every device of every host.
      seed: parameter init, training RNG and data order.
      log_every_steps, eval_every_steps, checkpoint_every_steps: periods (0 = never).
      keep_checkpoints: newest checkpoints kept.
      eval_ema: also evaluate the EMA parameters.
      init_checkpoint: released weights to start from when the workdir has no checkpoint.
      dataset: what the workdir records of the dataset for evaluation and prediction:
        {"class_names": names or None, "eval_margin": the eval resize margin or None}.
    """

    config: ml_collections.ConfigDict
    plan: Plan
    model: hk.Transformed
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    policy: jmp.Policy
    label_smoothing: float
    max_ema_decay: float
    use_sam: bool
    batch_size: int
    seed: int
    log_every_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    eval_ema: bool
    init_checkpoint: str
    dataset: dict[str, Any] = dataclasses.field(default_factory=dict)

    def input_dtype(self) -> str:
        """Images in bfloat16 when computing in it (halves the transfers), else float32."""
        return "bfloat16" if self.policy.compute_dtype == jnp.bfloat16 else "float32"

    def train_batches(
        self,
        start_step: int,
        process_index: int | None = None,
        process_count: int | None = None,
        local_device_count: int | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This process's shard of the training batches, from `start_step` on.

        The layout arguments default to this process's; pass them to see another process's.
        """
        from nfnets_jax.data import pipeline

        c = self.config
        return pipeline.train_iterator(
            c.dataset,
            data_dir=c.data_dir or None,
            global_batch_size=self.batch_size,
            image_size=self.plan.train_image_size,
            dtype=self.input_dtype(),
            augment=augment_options(c, self.plan),
            seed=self.seed,
            start_step=start_step,
            process_index=jax.process_index() if process_index is None else process_index,
            process_count=jax.process_count() if process_count is None else process_count,
            local_device_count=(
                jax.local_device_count() if local_device_count is None else local_device_count
            ),
        )

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this process's shard of the eval split, padded and masked."""
        from nfnets_jax.data import pipeline

        c = self.config
        return pipeline.eval_iterator(
            c.dataset,
            data_dir=c.data_dir or None,
            split=c.eval_split or None,
            global_batch_size=c.eval_batch_size,
            image_size=self.plan.eval_image_size,
            dtype=self.input_dtype(),
        )


def build_recipe(config: ml_collections.ConfigDict, data_info: Any = None) -> Recipe:
    """Reads `config` once into a `Recipe`.

    Args:
      config: the training config (configs/default.py declares every field).
      data_info: (num_classes, num_train_examples), or a `DatasetInfo`; None reads it off
        the dataset (`dataset_info`, which also checks the splits).

    Raises:
      ValueError: for an invalid config (see `validate_config`, `make_plan`).
    """
    validate_config(config)
    info = dataset_info(config) if data_info is None else data_info
    num_classes, num_train = info[0], info[1]
    plan = make_plan(config, num_classes, num_train)
    dataset = {"class_names": None, "eval_margin": None}
    if hasattr(info, "class_names"):
        names = info.class_names
        dataset = {"class_names": list(names) if names else None, "eval_margin": info.eval_margin}
    return Recipe(
        config=config,
        plan=plan,
        model=build_model(config, plan.num_classes),
        schedule=make_schedule(plan),
        optimizer=make_optimizer(config, plan),
        policy=precision_policy(config.dtype),
        label_smoothing=config.label_smoothing,
        max_ema_decay=config.ema_decay,
        use_sam=config.sam.enabled,
        batch_size=config.batch_size,
        seed=config.seed,
        log_every_steps=config.log_every_steps,
        eval_every_steps=config.eval_every_steps,
        checkpoint_every_steps=config.checkpoint_every_steps,
        keep_checkpoints=config.keep_checkpoints,
        eval_ema=config.eval_ema,
        init_checkpoint=config.init_checkpoint,
        dataset=dataset,
    )
