"""Evaluation of NFNet parameters: top-1 / top-5 accuracy, data parallel over devices.

`load_checkpoint` opens any checkpoint (zoo name, released pickle, `.npz`, timm `.pth`, or a
training workdir) and returns its parameters with the `nfnet.NFNet` arguments that fit them;
`evaluate_checkpoint` runs the paper's protocol on a dataset and reports the published
numbers beside the measured ones; `format_table` prints such reports; `classify_files`
labels image files.

`evaluate(apply_fn, params, batches)` takes any parameter tree (a released checkpoint, a
converted `.npz`, timm weights or a training state's params) and an iterable of batches
shaped like `data.pipeline.eval_iterator`'s: {"images": [D, B, H, W, 3] float,
"labels": [D, B] int, "mask": [D, B]} with D = local devices. Padding examples (mask 0)
are never counted, so each real example counts exactly once. Counts are summed across every
device of every process with `parallel.psum`, so all processes return the global result.
"""

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import nfnet, parallel
from nfnets_jax.checkpoints import released, tree, zoo

ApplyFn = Callable[[hk.Params, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Accuracy over a dataset.

    Attributes:
      top1: fraction of examples whose top-scoring class is the label.
      top5: fraction whose label is among the 5 top-scoring classes (all classes if < 5).
      count: number of examples counted (padding excluded).
      loss: mean softmax cross-entropy.
    """

    top1: float
    top5: float
    count: int
    loss: float


def model_apply_fn(variant: str = "F0", num_classes: int = 1000, **model_kwargs: Any) -> ApplyFn:
    """`apply(params, images) -> logits` of `nfnet.NFNet` in inference mode.

    Args:
      variant: the NFNet variant.
      num_classes: classifier size.
      **model_kwargs: further `nfnet.NFNet` arguments (numerics, width, depths, ...).
    """

    def forward(images: jax.Array) -> jax.Array:
        model = nfnet.NFNet(num_classes=num_classes, variant=variant, **model_kwargs)
        return model(images, is_training=False)["logits"]

    return hk.without_apply_rng(hk.transform(forward)).apply


def init_params(
    variant: str = "F0",
    num_classes: int = 1000,
    image_size: int = 32,
    seed: int = 0,
    **model_kwargs: Any,
) -> hk.Params:
    """Freshly initialised parameters of `nfnet.NFNet` (host numpy), e.g. for tests."""

    def forward(images: jax.Array) -> jax.Array:
        model = nfnet.NFNet(num_classes=num_classes, variant=variant, **model_kwargs)
        return model(images, is_training=False)["logits"]

    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params = hk.transform(forward).init(jax.random.PRNGKey(seed), images)
    return jax.tree.map(np.array, params)  # Writable host copies.


def batch_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Masked sums over a batch: examples, top-1 / top-5 hits, cross-entropy (float32).

    Padding examples (mask 0) count for nothing. Shared with the trainer's `eval_step`.
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hits = top == labels[:, None]
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
        "count": jnp.sum(mask),
        "top1": jnp.sum(hits[:, 0] * mask),
        "top5": jnp.sum(jnp.any(hits, axis=-1) * mask),
        "loss": jnp.sum(nll * mask),
    }


def make_eval_step(apply_fn: ApplyFn) -> Callable[..., dict[str, jax.Array]]:
    """A pmapped step: (replicated params, sharded batch) -> global sums (replicated)."""

    def step(params: hk.Params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = apply_fn(params, batch["images"])
        return parallel.psum(batch_counts(logits, batch["labels"], batch["mask"]))

    return parallel.pmap(step)


def _check_batch(batch: Mapping[str, Any], num_devices: int, index: int) -> None:
    for key in ("images", "labels", "mask"):
        if key not in batch:
            raise KeyError(
                f"Batch {index} has no {key!r}; eval batches need 'images', "
                f"'labels' and 'mask' shaped [devices, per_device, ...]."
            )
    images, labels, mask = (np.shape(batch[k]) for k in ("images", "labels", "mask"))
    if images[0] != num_devices or len(images) != 5:
        raise ValueError(
            f"Batch {index}: images must be [devices={num_devices}, B, H, W, C], got {images}."
        )
    if labels != images[:2] or mask != images[:2]:
        raise ValueError(
            f"Batch {index}: labels {labels} and mask {mask} must both be "
            f"{images[:2]} (the images' leading axes)."
        )


def evaluate(
    apply_fn: ApplyFn,
    params: hk.Params,
    batches: Iterable[Mapping[str, Any]],
    eval_step: Callable[..., Any] | None = None,
) -> EvalResult:
    """Top-1 / top-5 accuracy of `params` over `batches`, data parallel with pmap.

    Args:
      apply_fn: `apply(params, images) -> logits`, e.g. from `model_apply_fn`.
      params: the parameter tree (host or device arrays, not replicated).
      batches: {"images": [D, B, H, W, C], "labels": [D, B] int, "mask": [D, B]} with D the
        local device count; mask 0 marks padding.
      eval_step: a step from `make_eval_step(apply_fn)`, to reuse its compilation.

    Returns:
      The accuracy over all masked-in examples of all processes.

    Raises:
      ValueError: a batch is mis-shaped, a label is out of range, or nothing was counted.
    """
    num_devices = jax.local_device_count()
    eval_step = eval_step or make_eval_step(apply_fn)
    replicated = parallel.replicate(params)
    totals = {"count": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
    for index, batch in enumerate(batches):
        _check_batch(batch, num_devices, index)
        labels = np.asarray(batch["labels"]).astype(np.int32)
        mask = np.asarray(batch["mask"]).astype(np.float32)
        sums = eval_step(
            replicated,
            parallel.shard(
                {"images": np.asarray(batch["images"], np.float32), "labels": labels, "mask": mask}
            ),
        )
        # Device sums are float32; adding per batch in float64 keeps counts exact.
        for key, value in parallel.unreplicate(sums).items():
            totals[key] += float(value)
    count = int(round(totals["count"]))
    if count == 0:
        raise ValueError("No examples were evaluated (empty iterator or all masks zero).")
    return EvalResult(
        top1=totals["top1"] / count,
        top5=totals["top5"] / count,
        count=count,
        loss=totals["loss"] / count,
    )


def predict_logits(apply_fn: ApplyFn, params: hk.Params, images: np.ndarray) -> np.ndarray:
    """Logits for a small host batch of images [N, H, W, C] on one device (jit)."""
    return np.asarray(jax.jit(apply_fn)(params, jnp.asarray(images, jnp.float32)))


def load_workdir_params(workdir: str, step: int | None = None, ema: bool = True) -> hk.Params:
    """Parameters from a training workdir's newest (or `step`) orbax checkpoint.

    Args:
      workdir: the trainer's workdir (checkpoints under `<workdir>/checkpoints/<step>`).
      step: which checkpoint; the newest when None.
      ema: take the EMA parameters when the checkpoint has them (the reference evaluates
        both; EMA is usually better).

    Returns:
      The parameter tree, host numpy.
    """
    import orbax.checkpoint as ocp  # Optional dependency (the "train" extra).

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints directory in workdir {workdir}.")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {directory}.")
    state = manager.restore(int(step), args=ocp.args.StandardRestore())
    manager.close()
    state = state if isinstance(state, Mapping) else dataclasses.asdict(state)
    for key in ("ema_params", "params") if ema else ("params",):
        if key in state and state[key] is not None:
            return jax.tree.map(np.asarray, state[key])
    raise KeyError(f"Checkpoint {step} in {directory} has no 'params' (keys: {sorted(state)}).")


def load_checkpoint(
    checkpoint: str,
    variant: str | None = None,
    ema: bool = True,
    progress: TextIO | None = sys.stderr,
) -> tuple[hk.Params, dict[str, Any]]:
    """Parameters of any checkpoint and the `nfnet.NFNet` arguments that fit them.

    Args:
      checkpoint: a zoo name ("F0".."F6"), a released pickle, a `.npz` (`released.save_npz`),
        a timm `.pth`, or a training workdir (its newest orbax checkpoint).
      variant: the expected variant; None detects it from the parameters (custom trees get
        explicit depths / widths).
      ema: for workdirs, take the EMA parameters when present.
      progress: stream for a zoo download's progress bar.

    Returns:
      (params, model_kwargs) where `model_kwargs` includes variant, num_classes and numerics
      ("timm" for timm files, else "reference").

    Raises:
      CheckpointMismatchError: the parameters do not fit `variant` (listing the differences).
    """
    if os.path.isdir(checkpoint):
        params, fmt = load_workdir_params(checkpoint, ema=ema), "orbax"
    else:
        path = zoo.resolve(checkpoint, progress=progress)
        fmt = released.sniff_format(path)
        params = released.load_params(path)
    kwargs = tree.model_kwargs(params)
    if variant is not None:
        kwargs = {"variant": variant, "num_classes": kwargs["num_classes"]}
    kwargs["numerics"] = "timm" if fmt == "torch" else "reference"
    model_args = {k: v for k, v in kwargs.items() if k not in ("variant", "num_classes")}
    tree.validate(params, kwargs["variant"], kwargs["num_classes"], **model_args)
    return params, kwargs


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """One evaluated checkpoint, with the published numbers when there are any.

    Attributes:
      checkpoint: what was evaluated (name or path).
      model: the variant name, or a description of a custom tree.
      dataset: dataset and split.
      resolution: test image side in pixels.
      result: the measured accuracy.
      published_top1, published_top5: the paper's ImageNet numbers (%), or None.
      published_resolution: the resolution those were measured at.
    """

    checkpoint: str
    model: str
    dataset: str
    resolution: int
    result: EvalResult
    published_top1: float | None = None
    published_top5: float | None = None
    published_resolution: int | None = None


def describe_model(kwargs: Mapping[str, Any]) -> str:
    """A short model name: the variant, or "custom(depths, widths)" for other trees."""
    if "depths" in kwargs:
        return f"custom(depths={list(kwargs['depths'])}, widths={list(kwargs['widths'])})"
    return kwargs["variant"]


def published(variant: str) -> tuple[float, float] | None:
    """Published ImageNet (top-1, top-5) of a released variant, or None."""
    entry = zoo.ZOO.get(variant)
    return None if entry is None else (entry.top1, entry.top5)


def evaluate_checkpoint(
    checkpoint: str,
    dataset: str = "imagenet2012",
    *,
    variant: str | None = None,
    resolution: int | None = None,
    global_batch_size: int | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    manual_dir: str | None = None,
    numerics: str | None = None,
    ema: bool = True,
    group_conv: str = "auto",
    margin: int | None = None,
    params: hk.Params | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Accuracy of a checkpoint on a dataset with the paper's protocol (REFERENCE §5).

    Images are squash-resized (bicubic) to (S + 32)^2 and centre-cropped to S^2 by
    `data.pipeline.eval_iterator`; S is the variant's test resolution unless `resolution`
    overrides it. Every example of the split is counted exactly once.

    Args:
      checkpoint: see `load_checkpoint` (used as the report's label when `params` is given).
      dataset: a `data.pipeline` dataset: "imagenet2012", "digits", "tfds:<name>",
        "folder:<path>".
      variant: expected variant (None: detected).
      resolution: test px override.
      global_batch_size: examples per step over all devices (default 16 per device).
      data_dir, split, manual_dir, margin: passed to the input pipeline.
      numerics: "reference" or "timm" (None: "timm" for timm files, else "reference").
      ema: for workdirs, evaluate the EMA parameters when present.
      group_conv: grouped-convolution strategy of the model.
      params, model_kwargs: evaluate these parameters (e.g. a trainer's) instead of
        loading `checkpoint`; `model_kwargs` default to `tree.model_kwargs(params)`.

    Returns:
      An `EvalReport`.
    """
    from nfnets_jax.data import pipeline  # TensorFlow-based; imported only to evaluate.

    if params is None:
        params, kwargs = load_checkpoint(checkpoint, variant=variant, ema=ema)
    else:
        kwargs = dict(model_kwargs or tree.model_kwargs(params))
        kwargs.setdefault("numerics", "reference")
    if numerics is not None:
        kwargs["numerics"] = numerics
    kwargs["group_conv"] = group_conv
    spec = nfnet.VARIANTS[kwargs["variant"]]
    custom = "depths" in kwargs
    resolution = resolution or spec["test_imsize"]
    global_batch_size = global_batch_size or 16 * jax.device_count()
    batches = pipeline.eval_iterator(
        dataset,
        data_dir=data_dir,
        split=split,
        global_batch_size=global_batch_size,
        image_size=resolution,
        margin=margin,
        manual_dir=manual_dir,
    )
    result = evaluate(model_apply_fn(**kwargs), params, batches)
    pub = None if custom or dataset != "imagenet2012" else published(kwargs["variant"])
    return EvalReport(
        checkpoint=checkpoint,
        model=describe_model(kwargs),
        dataset=f"{dataset}:{split}" if split else dataset,
        resolution=resolution,
        result=result,
        published_top1=pub[0] if pub else None,
        published_top5=pub[1] if pub else None,
        published_resolution=spec["test_imsize"] if pub else None,
    )


def format_table(reports: Sequence[EvalReport]) -> str:
    """A text table of measured and published accuracy (percent)."""
    header = (
        "model",
        "checkpoint",
        "dataset",
        "px",
        "examples",
        "top-1",
        "top-5",
        "paper top-1",
        "paper top-5",
        "delta top-1",
    )

    def pub(value: float | None, r: EvalReport) -> str:
        if value is None:
            return "-"
        at = "" if r.published_resolution == r.resolution else f" @{r.published_resolution}"
        return f"{value:.1f}{at}"

    rows = []
    for r in reports:
        delta = (
            "-" if r.published_top1 is None else f"{100 * r.result.top1 - r.published_top1:+.2f}"
        )
        rows.append(
            (
                r.model,
                r.checkpoint,
                r.dataset,
                str(r.resolution),
                str(r.result.count),
                f"{100 * r.result.top1:.2f}",
                f"{100 * r.result.top5:.2f}",
                pub(r.published_top1, r),
                pub(r.published_top5, r),
                delta,
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
    return "\n".join(
        [line(header), line(tuple("-" * w for w in widths))] + [line(row) for row in rows]
    )


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
    apply_fn: ApplyFn,
    params: hk.Params,
    paths: Sequence[str],
    class_names: Sequence[str],
    resolution: int,
    top_k: int = 5,
    margin: int = 32,
) -> list[Prediction]:
    """The `top_k` most probable classes of each image file (softmax probabilities)."""
    logits = predict_logits(apply_fn, params, preprocess_files(paths, resolution, margin))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
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
