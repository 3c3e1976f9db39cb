"""Prediction: the most probable classes of image files, with the evaluation protocol.

`classify_files` preprocesses each file as evaluation does (bicubic squash-resize to
(S + margin)^2, centre crop S^2, normalisation) and returns its top classes with softmax
probabilities; `class_names` gives a model's class names (a labels file, a training
workdir's recorded names, ImageNet's for 1000 classes, else "class <i>").
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.checkpoints import labels
from nfnets_jax.models import registry


def class_names(
    num_classes: int, labels_file: str | None = None, recorded: Sequence[str] | None = None
) -> list[str]:
    """Names from `labels_file` (one per line), else `recorded` (a workdir's), ImageNet's for
    1000 classes, else "class <i>"."""
    if labels_file:
        with open(labels_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    # ImageNet's TFDS label names are WordNet ids (n01440764...): the readable names win.
    imagenet_ids = num_classes == labels.NUM_CLASSES and all(
        re.fullmatch(r"n\d{8}", name) for name in recorded or ()
    )
    if recorded and len(recorded) == num_classes and not imagenet_ids:
        return list(recorded)
    if num_classes == labels.NUM_CLASSES:
        return labels.imagenet_names()
    return [f"class {i}" for i in range(num_classes)]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image: (label index, class name, probability), best first."""

    path: str
    top: tuple[tuple[int, str, float], ...]


def _preprocess_file(tf: Any, path: str, resolution: int, margin: int) -> np.ndarray:
    from nfnets_jax.data import preprocess  # TensorFlow-based.

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read image {path}: {e.strerror or e}") from e
    try:
        image = preprocess.eval_image(tf.constant(data), resolution, margin)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"Cannot decode image {path}: {e.message}") from e
    return preprocess.normalize(image, tf.float32).numpy()


def preprocess_files(
    paths: Sequence[str],
    resolution: int,
    margin: int = 32,
    failures: list[tuple[str, str]] | None = None,
) -> np.ndarray:
    """Image files -> normalised float32 [N, S, S, 3] with the evaluation protocol.

    Args:
      paths: image files.
      resolution: S.
      margin: the resize margin.
      failures: None raises on the first file that cannot be read or decoded; a list
        collects (path, reason) for each such file instead and leaves it out.

    Raises:
      ValueError: naming a file that cannot be read or decoded (without `failures`).
    """
    from nfnets_jax.data import tf_runtime  # TensorFlow-based.

    tf = tf_runtime.import_tf()
    images = []
    for path in paths:
        try:
            images.append(_preprocess_file(tf, path, resolution, margin))
        except ValueError as e:
            if failures is None:
                raise
            failures.append((path, str(e)))
    if not images:
        return np.zeros((0, resolution, resolution, 3), np.float32)
    return np.stack(images)


def classify_files(
    apply_fn: registry.ApplyFn,
    params: hk.Params,
    paths: Sequence[str],
    class_names: Sequence[str],
    resolution: int,
    top_k: int = 5,
    margin: int = 32,
    failures: list[tuple[str, str]] | None = None,
) -> list[Prediction]:
    """The `top_k` most probable classes of each image file (softmax probabilities).

    With a `failures` list, files that cannot be read or decoded are recorded there as
    (path, reason) and left out (see `preprocess_files`); without it the first one raises.
    """
    failed_before = len(failures) if failures is not None else 0
    images = jnp.asarray(preprocess_files(paths, resolution, margin, failures))
    if failures is not None:
        bad = {path for path, _ in failures[failed_before:]}
        paths = [p for p in paths if p not in bad]
    if not paths:
        return []
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
