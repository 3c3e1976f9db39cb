"""Evaluation: top-1 / top-5 accuracy, data parallel over devices, and evaluation reports.

`evaluate(apply_fn, params, batches)` takes any parameter tree (a released checkpoint, a
converted `.npz`, timm weights or a training state's params) and an iterable of batches
shaped like `data.pipeline.eval_iterator`'s: {"images": [D, B, H, W, 3] float,
"labels": [D, B] int, "mask": [D, B]} with D = local devices. Padding examples (mask 0)
are never counted, so each real example counts exactly once. Counts are summed across every
device of every process with `parallel.psum`, so all processes return the global result.
`evaluate_replicated` is the loop itself, which the trainer shares.

`evaluate_checkpoint` runs the paper's protocol on a dataset for any checkpoint
(`checkpoints.loading`) and reports the published numbers beside the measured ones;
`format_table` prints such reports.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from nfnets_jax import parallel
from nfnets_jax.checkpoints import loading, run_record, tree, zoo
from nfnets_jax.models import registry

ApplyFn = registry.ApplyFn


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


def evaluate_replicated(
    eval_step: Callable[..., Any],
    replicated_params: hk.Params,
    batches: Iterable[Mapping[str, Any]],
) -> EvalResult:
    """The evaluation loop: accuracy of already replicated parameters over `batches`.

    The trainer calls it with its replicated (raw or EMA) parameters; `evaluate` replicates
    host parameters first.

    Args:
      eval_step: from `make_eval_step`.
      replicated_params: parameters with a leading local-device axis (`parallel.replicate`).
      batches: {"images": [D, B, H, W, C], "labels": [D, B] int, "mask": [D, B]} with D the
        local device count; mask 0 marks padding.

    Returns:
      The accuracy over all masked-in examples of all processes.

    Raises:
      ValueError: a batch is mis-shaped, or nothing was counted (an empty split).
    """
    num_devices = jax.local_device_count()
    totals = {"count": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
    for index, batch in enumerate(batches):
        _check_batch(batch, num_devices, index)
        sharded = parallel.shard(
            {
                "images": batch["images"],
                "labels": np.asarray(batch["labels"]).astype(np.int32),
                "mask": np.asarray(batch["mask"]).astype(np.float32),
            }
        )
        sums = eval_step(replicated_params, sharded)
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


def evaluate(
    apply_fn: ApplyFn,
    params: hk.Params,
    batches: Iterable[Mapping[str, Any]],
    eval_step: Callable[..., Any] | None = None,
) -> EvalResult:
    """Top-1 / top-5 accuracy of host `params` over `batches`, data parallel with pmap.

    Args:
      apply_fn: `apply(params, images) -> logits`, e.g. `registry.logits_fn(...)`.
      params: the parameter tree (host or device arrays, not replicated).
      batches: see `evaluate_replicated`.
      eval_step: a step from `make_eval_step(apply_fn)`, to reuse its compilation.

    Returns:
      The accuracy over all masked-in examples of all processes.
    """
    eval_step = eval_step or make_eval_step(apply_fn)
    return evaluate_replicated(eval_step, parallel.replicate(params), batches)


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
      notes: lines to show with the result: what a workdir's record set, flags that
        override it, a class-count mismatch.
    """

    checkpoint: str
    model: str
    dataset: str
    resolution: int
    result: EvalResult
    published_top1: float | None = None
    published_top5: float | None = None
    published_resolution: int | None = None
    notes: tuple[str, ...] = ()


def describe_model(kwargs: Mapping[str, Any]) -> str:
    """A short model name: the variant, or "custom(depths, widths)" for other trees."""
    if "depths" in kwargs:
        return f"custom(depths={list(kwargs['depths'])}, widths={list(kwargs['widths'])})"
    return kwargs["variant"]


def published(variant: str) -> tuple[float, float] | None:
    """Published ImageNet (top-1, top-5) of a released variant, or None."""
    entry = zoo.ZOO.get(variant)
    return None if entry is None else (entry.top1, entry.top5)


def _load_for_evaluation(
    checkpoint: str,
    variant: str | None,
    ema: bool,
    step: int | None,
    params: hk.Params | None,
    model_kwargs: Mapping[str, Any] | None,
) -> tuple[hk.Params, str, dict[str, Any], run_record.RunRecord | None]:
    """(params, model name, model kwargs, the workdir's record or None)."""
    if params is not None:
        kwargs = dict(model_kwargs or tree.model_kwargs(params))
        kwargs.setdefault("numerics", "reference")
        return params, "NFNet", kwargs, None
    record = run_record.read(checkpoint)
    if record is not None:  # A training workdir: its own model, as recorded.
        run_record.check_variant(record, variant)
        return (
            run_record.load_params(record, step, ema),
            record.model_name,
            dict(record.model_kwargs),
            record,
        )
    if step is not None:
        raise ValueError(f"step={step} applies to training workdirs only, not to {checkpoint!r}.")
    params, kwargs = loading.load(checkpoint, variant=variant, ema=ema)
    return params, "NFNet", kwargs, None


def _workdir_defaults(
    checkpoint: str,
    record: run_record.RunRecord,
    resolution: int | None,
    margin: int | None,
    dataset: str | None,
    split: str | None,
) -> tuple[list[str], tuple[Any, ...]]:
    """(notes, (resolution, margin, dataset, split)) with the run's values where not given."""
    notes = [f"workdir {checkpoint}: {record.describe()} (its {run_record.RECORD})"]
    notes += [
        f"warning: {line}"
        for line in run_record.overrides(
            record, resolution=resolution, margin=margin, dataset=dataset
        )
    ]
    if split is None and dataset in (None, record.dataset):
        split = record.eval_split
    return notes, (
        resolution or record.eval_image_size,
        record.eval_margin if margin is None else margin,
        dataset or record.dataset,
        split,
    )


def evaluate_checkpoint(
    checkpoint: str,
    dataset: str | None = None,
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
    step: int | None = None,
) -> EvalReport:
    """Accuracy of a checkpoint on a dataset with the paper's protocol (REFERENCE §5).

    Images are squash-resized (bicubic) to (S + margin)^2 and centre-cropped to S^2 by
    `data.pipeline.eval_iterator`. For a training workdir, the model, its options, S, the
    margin, the dataset and the split are the run's own (its config.json, see
    `checkpoints.run_record`) unless an argument overrides them, which the report's notes
    (and a logged warning) say; otherwise S is the variant's test resolution, the dataset
    ImageNet. Every example of the split is counted exactly once.

    Args:
      checkpoint: see `checkpoints.loading.load` (the report's label when `params` is given).
      dataset: a `data.pipeline` dataset: "imagenet2012", "digits", "tfds:<name>",
        "folder:<path>" (None: a workdir's own, else "imagenet2012").
      variant: expected variant (None: detected).
      resolution: test px override.
      global_batch_size: examples per step over all devices (default 16 per device).
      data_dir, split, manual_dir, margin: passed to the input pipeline.
      numerics: "reference" or "timm" (None: "timm" for timm files, else "reference").
      ema: for workdirs, evaluate the EMA parameters when present.
      group_conv: grouped-convolution strategy of the model.
      params, model_kwargs: evaluate these parameters (e.g. a trainer's) instead of
        loading `checkpoint`; `model_kwargs` default to `tree.model_kwargs(params)`.
      step: for workdirs, the checkpoint step (None: the newest readable one).

    Returns:
      An `EvalReport`.
    """
    from nfnets_jax.data import pipeline  # TensorFlow-based; imported only to evaluate.

    params, model_name, kwargs, record = _load_for_evaluation(
        checkpoint, variant, ema, step, params, model_kwargs
    )
    notes = []
    if record is not None:
        notes, (resolution, margin, dataset, split) = _workdir_defaults(
            checkpoint, record, resolution, margin, dataset, split
        )
    dataset = dataset or "imagenet2012"
    if numerics is not None:
        if model_name != "NFNet":
            raise ValueError(f"numerics={numerics!r} applies to NFNet models, not {model_name}.")
        kwargs["numerics"] = numerics
    kwargs["group_conv"] = group_conv
    spec = registry.variant(model_name, kwargs["variant"])
    custom = "depths" in kwargs or model_name != "NFNet"
    resolution = resolution or spec.test_px
    info = pipeline.dataset_info(dataset, data_dir, eval_split=split, manual_dir=manual_dir)
    if info.num_classes != kwargs["num_classes"]:
        notes.append(
            f"warning: the model has {kwargs['num_classes']} classes, dataset {dataset} "
            f"has {info.num_classes}: labels are compared with the model's class ids as is"
        )
    for note in notes:
        (logging.warning if note.startswith("warning") else logging.info)("%s", note)
    batches = pipeline.eval_iterator(
        dataset,
        data_dir=data_dir,
        split=split,
        global_batch_size=global_batch_size or 16 * jax.device_count(),
        image_size=resolution,
        margin=margin,
        manual_dir=manual_dir,
    )
    result = evaluate(registry.logits_fn(model_name, **kwargs), params, batches)
    pub = None if custom or dataset != "imagenet2012" else published(kwargs["variant"])
    return EvalReport(
        checkpoint=checkpoint,
        model=describe_model(kwargs)
        if model_name == "NFNet"
        else f"{model_name} {kwargs['variant']}",
        dataset=f"{dataset}:{split}" if split else dataset,
        resolution=resolution,
        result=result,
        published_top1=pub[0] if pub else None,
        published_top5=pub[1] if pub else None,
        published_resolution=spec.test_px if pub else None,
        notes=tuple(notes),
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
