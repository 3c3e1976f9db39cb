"""One home for the model facts the rest of the project dispatches on.

- Model names -> classes (`MODEL_CLASSES`: "NFNet", "NFResNet") and their variant tables
  (`variant`, `find_variant`; the tables themselves are data in `variants`).
- The classifier weight, which AGC leaves unclipped (`CLASSIFIER_WEIGHT_PATTERN`,
  `is_classifier_weight`, `agc_mask`).
- The one forward builder (`build_forward`), used by the trainer, evaluation, prediction,
  checkpoint validation, counting and the benchmarks, with optional per-block
  rematerialisation; `logits_fn`, `init_params` and `param_shapes` are thin uses of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import treepaths
from nfnets_jax.models import layers, nfnet, nfresnet, variants

MODEL_CLASSES: dict[str, type[hk.Module]] = {"NFNet": nfnet.NFNet, "NFResNet": nfresnet.NFResNet}
# The classifier weight of both families (root "NFNet" or the reference's "NF_ResNet"), also
# when the model sits inside an outer Haiku module. The paper does not clip it.
CLASSIFIER_WEIGHT_PATTERN = r"(?:.*/~/)?(?:NFNet|NF_ResNet)/~/linear/w"
_RESIDUAL_BLOCKS = (nfnet.NFBlock, nfresnet.NFResBlock)

ApplyFn = Callable[[hk.Params, jax.Array], jax.Array]


def model_class(model_name: str) -> type[hk.Module]:
    """The Haiku module class of a model family.

    Raises:
      ValueError: naming the valid model names.
    """
    if model_name not in MODEL_CLASSES:
        raise ValueError(f"Unknown model_name {model_name!r}; valid: {', '.join(MODEL_CLASSES)}.")
    return MODEL_CLASSES[model_name]


def variant(model_name: str, name: str) -> variants.Variant:
    """The architecture and recipe defaults of one variant (see `variants.Variant`).

    Raises:
      ValueError: for an unknown model name or variant (the message lists the valid ones).
    """
    return variants.lookup(model_name, name)


def find_variant(name: str) -> tuple[str, variants.Variant]:
    """(model name, row) of a variant of either family, e.g. "F1+" or "ResNet50".

    Raises:
      ValueError: listing every valid variant.
    """
    for model_name, table in variants.TABLES.items():
        if name in table:
            return model_name, table[name]
    valid = ", ".join(v for table in variants.TABLES.values() for v in table)
    raise ValueError(f"Unknown variant {name!r}; valid variants: {valid}.")


def is_classifier_weight(path: str) -> bool:
    """Whether a parameter path ("module/param") is the classifier weight."""
    return re.fullmatch(CLASSIFIER_WEIGHT_PATTERN, path) is not None


def agc_mask(params: hk.Params) -> Any:
    """The reference AGC mask: clip every leaf except the classifier weight.

    Excludes exactly ``'NFNet/~/linear/w'`` (or ``'NF_ResNet/~/linear/w'``); squeeze-excite
    layers, gains, biases, skip gains and the classifier bias are clipped, as in the release.

    Args:
      params: Haiku parameters of an `NFNet` or `NFResNet`.

    Returns:
      A pytree of bools, True = clip.

    Raises:
      ValueError: if the tree has no classifier weight under that name (lists the paths).
    """
    return treepaths.mask_from_patterns(params, exclude=CLASSIFIER_WEIGHT_PATTERN)


def _remat_blocks(next_f, args, kwargs, context):
    """Method interceptor: every residual block call under `hk.remat` (jax.checkpoint)."""
    if isinstance(context.module, _RESIDUAL_BLOCKS) and context.method_name == "__call__":
        x, *rest = args  # Only the activations are traced; is_training stays static.
        return hk.remat(lambda y: next_f(y, *rest, **kwargs))(x)
    return next_f(*args, **kwargs)


def forward_fn(
    model_name: str = "NFNet", *, remat: bool = False, **model_kwargs: Any
) -> Callable[..., dict[str, jax.Array]]:
    """The untransformed forward function of `build_forward` (to compose inside a transform,
    e.g. under `hk.intercept_methods`)."""
    cls = model_class(model_name)

    def forward(
        images: jax.Array, is_training: bool = False, **call_kwargs: Any
    ) -> dict[str, jax.Array]:
        net = cls(**model_kwargs)
        if remat and is_training:
            with hk.intercept_methods(_remat_blocks):
                return net(images, is_training=is_training, **call_kwargs)
        return net(images, is_training=is_training, **call_kwargs)

    return forward


def build_forward(
    model_name: str = "NFNet", *, remat: bool = False, **model_kwargs: Any
) -> hk.Transformed:
    """The network as a Haiku transform.

    ``init(rng, images, is_training=False)`` and
    ``apply(params, rng, images, is_training=False, **call_kwargs)`` return the model's
    output dict ("logits", "pool", and with ``return_features`` / ``return_metrics`` the
    feature maps / signal statistics). Training mode needs an rng (dropout, stochastic
    depth).

    Args:
      model_name: "NFNet" or "NFResNet".
      remat: in training mode, recompute every residual block in the backward pass
        (`jax.checkpoint` per block through `hk.intercept_methods`; same parameters, same
        values, less activation memory, about one more forward pass of compute).
      **model_kwargs: the model's constructor arguments (num_classes, variant, ...).

    Raises:
      ValueError: for an unknown model name.
    """
    transformed = hk.transform(forward_fn(model_name, remat=remat, **model_kwargs))

    def init(*args: Any, **kwargs: Any) -> hk.Params:
        # The parameters (values and RNG use) do not depend on how convolutions are computed,
        # so init is traced with the simplest strategies: a smaller program, and the same one
        # for every `group_conv` / `conv_grad` setting (the forward pass in it is dead code).
        with layers.forced_group_conv("native"), layers.forced_conv_grad("xla"):
            return transformed.init(*args, **kwargs)

    return hk.Transformed(init, transformed.apply)


def logits_fn(model_name: str = "NFNet", **model_kwargs: Any) -> ApplyFn:
    """``apply(params, images) -> logits`` in inference mode (no rng)."""
    model = build_forward(model_name, **model_kwargs)
    return lambda params, images: model.apply(params, None, images, False)["logits"]


def param_shapes(
    model_name: str = "NFNet", image_size: int = 32, in_channels: int = 3, **model_kwargs: Any
) -> Any:
    """The parameter tree as ShapeDtypeStructs (`jax.eval_shape`: nothing allocated).

    Parameter shapes do not depend on the resolution; a small `image_size` traces fastest.
    """
    model = build_forward(model_name, in_channels=in_channels, **model_kwargs)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def init_params(
    model_name: str = "NFNet", image_size: int = 32, seed: int = 0, **model_kwargs: Any
) -> hk.Params:
    """Freshly initialised parameters as writable host numpy arrays (e.g. for tests)."""
    model = build_forward(model_name, **model_kwargs)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
    return jax.tree.map(np.array, params)
