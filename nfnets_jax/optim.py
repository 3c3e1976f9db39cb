"""The reference NFNet optimizer: AGC -> weight decay -> SGD with Nesterov momentum.

Built from optax pieces (:func:`nfnets_jax.agc.adaptive_grad_clip`,
``optax.add_decayed_weights``, ``optax.sgd``) with the reference parameter groups:

============================  ====  ============  ==================
parameter                     AGC   weight decay  label
============================  ====  ============  ==================
conv / SE kernels ``w``       yes   yes           ``'clip+decay'``
classifier ``w``              no    yes           ``'decay_only'``
gains, biases, ``b``,         yes   no            ``'clip_only'``
skip gains, classifier ``b``
============================  ====  ============  ==================

The learning-rate schedule is linear warmup from 0 followed by cosine decay to 0
(:func:`warmup_cosine_schedule`); the peak learning rate is ``0.1 * batch_size / 256``
(:func:`scaled_learning_rate`), computed by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from nfnets_jax import agc, treepaths
from nfnets_jax.models import registry

# Parameter names (last path component) of this project's Haiku modules.
DECAY_PARAM_NAMES = frozenset({"w"})
NO_DECAY_PARAM_NAMES = frozenset({"gain", "bias", "b", "skip_gain"})

GROUP_LABELS = ("clip+decay", "clip_only", "decay_only", "none")


def default_decay_mask(params: optax.Params) -> Any:
    """Weight-decay mask of the reference recipe: kernels ``w`` only.

    Gains, biases (``bias``, ``b``) and skip gains get no weight decay; every kernel named
    ``w`` does, including the classifier and squeeze-excite kernels. Unknown parameter names
    raise instead of silently falling into either group.

    Args:
      params: Haiku parameters of an NFNet / NF-ResNet.

    Returns:
      A pytree of bools, True = apply weight decay.

    Raises:
      ValueError: If a parameter's name is not one of the known names.
    """
    leaves, treedef = jax.tree.flatten(params)
    paths = treepaths.param_paths(params)
    decay = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if name in DECAY_PARAM_NAMES:
            decay.append(True)
        elif name in NO_DECAY_PARAM_NAMES:
            decay.append(False)
        else:
            raise ValueError(
                f"default_decay_mask: unknown parameter name {name!r} (at {path!r}); known "
                f"decayed names {sorted(DECAY_PARAM_NAMES)}, not decayed "
                f"{sorted(NO_DECAY_PARAM_NAMES)}. Pass an explicit decay_mask."
            )
    return jax.tree.unflatten(treedef, decay)


def param_groups(
    params: optax.Params,
    agc_mask: Any | None = None,
    decay_mask: Any | None = None,
) -> Any:
    """Labels every parameter with its optimizer group.

    Uses the same masks as :func:`make_optimizer` given the same arguments, so it is the
    assignment that the optimizer applies.

    Args:
      params: The parameter pytree.
      agc_mask: AGC mask (pytree or function of params, True = clip); None for
        ``models.registry.agc_mask``.
      decay_mask: Weight-decay mask (True = decay); None for :func:`default_decay_mask`.

    Returns:
      A pytree with the structure of ``params`` whose leaves are ``'clip+decay'``,
      ``'clip_only'``, ``'decay_only'`` or ``'none'``.
    """
    # The same broadcasting as the transforms', so the groups are what the optimizer does.
    clip = treepaths.mask_values(
        registry.agc_mask if agc_mask is None else agc_mask, params, "agc_mask"
    )
    decay = treepaths.mask_values(
        default_decay_mask if decay_mask is None else decay_mask, params, "decay_mask"
    )
    labels = [
        {
            (True, True): "clip+decay",
            (True, False): "clip_only",
            (False, True): "decay_only",
            (False, False): "none",
        }[(c, d)]
        for c, d in zip(clip, decay, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), labels)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    clipping: float | None = 0.01,
    weight_decay: float = 2e-5,
    momentum: float | None = 0.9,
    nesterov: bool = True,
    agc_mask: Any | None = None,
    decay_mask: Any | None = None,
    *,
    eps: float = agc.DEFAULT_EPS,
    unit_axis: Any = agc.DEFAULT_UNIT_AXIS,
    track_per_param: bool = False,
    overflow_safe: bool = True,
) -> optax.GradientTransformation:
    """The reference NFNet optimizer as an optax chain.

    ``optax.chain(AGC, add_decayed_weights, sgd)``: unit-wise adaptive gradient clipping of
    the raw gradient (classifier weight excluded), then ``weight_decay * param`` added to the
    gradient of the kernels, then SGD with (Nesterov) momentum and the learning rate. Give it
    the cross-device averaged float32 gradients; ``update`` needs ``params``.

    Example::

        schedule = optim.warmup_cosine_schedule(
            base_lr=optim.scaled_learning_rate(batch_size), warmup_steps=5 * steps_per_epoch,
            total_steps=num_steps)
        opt = optim.make_optimizer(learning_rate=schedule)
        opt_state = opt.init(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics.update(optim.agc_metrics(opt_state))

    Args:
      learning_rate: A float or an optax schedule (step -> learning rate).
      clipping: AGC threshold lambda (0.01 in the reference at batch 4096; the paper uses
        larger values at smaller batches). None or 0 disables AGC.
      weight_decay: Coefficient of the L2 term added to the gradient
        (``g + weight_decay * w``) of the decayed parameters, after AGC.
      momentum: Momentum coefficient; None for plain SGD.
      nesterov: Nesterov momentum (reference: True).
      agc_mask: Which leaves AGC clips: pytree of bools or function of params, True = clip.
        None = ``models.registry.agc_mask`` (all but ``'NFNet/~/linear/w'``).
      decay_mask: Which leaves get weight decay, True = decay. None =
        :func:`default_decay_mask` (kernels ``w`` only).
      eps: AGC's floor on the weight norm.
      unit_axis: AGC's output-unit axis (see :func:`nfnets_jax.agc.adaptive_grad_clip`).
      track_per_param: Record AGC's per-parameter clipped fraction in the state.
      overflow_safe: AGC's overflow-safe norms (see
        :func:`nfnets_jax.agc.adaptive_grad_clip`); False: one pass, plain float32 sums.

    Returns:
      An ``optax.GradientTransformation``.
    """
    parts = []
    if clipping:
        parts.append(
            agc.adaptive_grad_clip(
                clipping,
                eps,
                mask=registry.agc_mask if agc_mask is None else agc_mask,
                unit_axis=unit_axis,
                track_per_param=track_per_param,
                overflow_safe=overflow_safe,
            )
        )
    if weight_decay:
        parts.append(
            optax.add_decayed_weights(
                weight_decay, mask=default_decay_mask if decay_mask is None else decay_mask
            )
        )
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    return optax.chain(*parts)


def agc_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """AGC statistics for logging: ``{'agc_clipped_fraction': ...}``, ``{}`` if AGC is off.

    Per-parameter fractions, when tracked, are added as ``'agc_clipped_fraction/<path>'``.

    Args:
      opt_state: The optimizer state.

    Returns:
      A dict of float32 scalars (per device under ``pmap``).
    """
    try:
        state = agc.find_state(opt_state)
    except ValueError:
        return {}
    metrics = {"agc_clipped_fraction": state.clipped_fraction}
    for path, value in state.per_param_clipped_fraction.items():
        metrics[f"agc_clipped_fraction/{path}"] = value
    return metrics


def scaled_learning_rate(
    batch_size: int, base_lr: float = 0.1, base_batch_size: int = 256
) -> float:
    """The reference peak learning rate, ``base_lr * batch_size / base_batch_size``.

    Args:
      batch_size: Global batch size (over all devices and hosts).
      base_lr: Learning rate at ``base_batch_size`` (0.1 in the reference).
      base_batch_size: Reference batch size (256).

    Returns:
      The learning rate (1.6 at batch 4096).
    """
    return base_lr * batch_size / base_batch_size


def warmup_cosine_schedule(
    base_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[Any], jax.Array]:
    """Linear warmup from 0 to ``base_lr``, then cosine decay to 0 at ``total_steps``.

    ``lr(t) = base_lr * t / warmup_steps`` for ``t < warmup_steps``, then
    ``0.5 * base_lr * (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps)))``.

    Args:
      base_lr: Peak learning rate (see :func:`scaled_learning_rate`).
      warmup_steps: Number of warmup steps (5 epochs in the reference); may be 0.
      total_steps: Total number of training steps, warmup included.

    Returns:
      An optax schedule (step -> learning rate).

    Raises:
      ValueError: Unless ``0 <= warmup_steps < total_steps``.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine_schedule needs 0 <= warmup_steps < total_steps, got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(base_lr, decay_steps=total_steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )
