"""Prediction: the most probable classes of image files, with the evaluation protocol.

`classify_files` preprocesses each file as evaluation does (bicubic squash-resize to
(S + margin)^2, centre crop S^2, normalisation) and returns its top classes with softmax
probabilities; `class_names` gives a model's class names (a labels file, ImageNet's for
1000 classes, else "class <i>").
"""

import dataclasses
from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.checkpoints import labels
from nfnets_jax.models import registry


def class_names(num_classes: int, labels_file: str | None = None) -> list[str]:
    """Names from `labels_file` (one per line), ImageNet's for 1000 classes, else "class <i>"."""
    if labels_file:
        with open(labels_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    if num_classes == labels.NUM_CLASSES:
        return labels.imagenet_names()
    return [f"class {i}" for i in range(num_classes)]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image: (label index, class name, probability), best first."""

    path: str
    top: tuple[tuple[int, str, float], ...]


def preprocess_files(paths: Sequence[str], resolution: int, margin: int = 32) -> np.ndarray:
    """Image files -> normalised float32 [N, S, S, 3] with the evaluation protocol."""
    from nfnets_jax.data import preprocess, tf_runtime  # TensorFlow-based.

    tf = tf_runtime.import_tf()
    images = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            image = preprocess.eval_image(tf.constant(data), resolution, margin)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"Cannot decode image {path}: {e.message}") from e
        images.append(preprocess.normalize(image, tf.float32).numpy())
    return np.stack(images)


def classify_files(
    apply_fn: registry.ApplyFn,
    params: hk.Params,
    paths: Sequence[str],
    class_names: Sequence[str],
    resolution: int,
    top_k: int = 5,
    margin: int = 32,
) -> list[Prediction]:
    """The `top_k` most probable classes of each image file (softmax probabilities)."""
    images = jnp.asarray(preprocess_files(paths, resolution, margin))
    logits = jax.jit(apply_fn)(params, images).astype(jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    if len(class_names) != probs.shape[-1]:
        raise ValueError(
            f"{len(class_names)} class names for a model with {probs.shape[-1]} classes."
        )
    predictions = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p, kind="stable")[:top_k]
        predictions.append(
            Prediction(path, tuple((int(i), class_names[i], float(p[i])) for i in order))
        )
    return predictions
