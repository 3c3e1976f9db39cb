"""Train and evaluation iterators shaped for data parallelism (pmap over local devices).

Batches are numpy dicts:
  train: images [local_devices, per_device_batch, S, S, 3] (float32 or bfloat16, normalised
         with mean (0.485, 0.456, 0.406) * 255 and std (0.229, 0.224, 0.225) * 255),
         labels float32 [local_devices, per_device_batch, num_classes] (one-hot or mixed
         target vectors; label smoothing is left to the trainer).
  eval:  images as above, labels int32 [local_devices, per_device_batch], mask float32
         [local_devices, per_device_batch] (1 real example, 0 padding).

Resumability: the train stream of a host is a pure function of (dataset, seed,
process_index, process_count, batch layout, augment config). Step `s` consumes positions
[s * E, (s + 1) * E) of the host's epoch-ordered example stream (E = per-host batch, doubled
when MixUp/CutMix is on); every random choice is a stateless function of the seed and that
position (or of the step for batch-level mixing). `train_iterator(..., start_step=s)` jumps
straight to epoch `s * E // epoch_size`, skips the rest within that epoch (records only, no
decoding), and yields exactly the batches an uninterrupted run yields from step `s` on.
"""

import dataclasses
import itertools
import typing
from collections.abc import Iterator

import numpy as np

from nfnets_jax.data import augment as augment_lib
from nfnets_jax.data import mixing, preprocess, sharding, sources, tf_runtime


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation switches (REFERENCE section 4); each can be turned off.

    Attributes:
      random_crop: inception-style crop, area 0.08-1, aspect 3/4-4/3 (else squash-resize).
      flip: random horizontal flip.
      randaugment_layers: RandAugment N (0 disables it).
      randaugment_magnitude: RandAugment M (0..10).
      mixup_alpha: MixUp Beta(alpha, alpha) parameter (0 disables MixUp).
      cutmix: CutMix on (with MixUp too, each takes half of the batch).
    """

    random_crop: bool = True
    flip: bool = True
    randaugment_layers: int = 0
    randaugment_magnitude: float = 0.0
    mixup_alpha: float = 0.0
    cutmix: bool = False

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix


# The reference F0 recipe (RandAugment 4 layers, magnitude 5; F1+ use other magnitudes).
PAPER_F0 = AugmentConfig(True, True, 4, 5.0, 0.2, True)
# Handwritten digits: no crop (8x8 digits fill the frame), no flip (digits are not mirror
# symmetric), nothing else: the quick start reaches >= 95% test accuracy in minutes.
DIGITS = AugmentConfig(False, False, 0, 0.0, 0.0, False)
NONE = AugmentConfig(False, False, 0, 0.0, 0.0, False)


def default_augment(dataset) -> AugmentConfig:
    """Sensible defaults: DIGITS for 'digits', PAPER_F0 otherwise."""
    return DIGITS if dataset == "digits" else PAPER_F0


def _as_augment_config(augment) -> AugmentConfig:
    if augment is None:
        return NONE
    if isinstance(augment, AugmentConfig):
        return augment
    fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    values = dict(augment.items() if hasattr(augment, "items") else augment)
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"Unknown augment options {sorted(unknown)}; known: {sorted(fields)}.")
    return AugmentConfig(**values)


class DatasetInfo(typing.NamedTuple):
    num_classes: int
    num_train: int
    num_eval: int
    eval_split: str
    eval_margin: int
    class_names: tuple[str, ...] | None = None


def _tf_dtype(dtype):
    """float32 / bfloat16 given as a string, numpy/JAX dtype or tf dtype -> tf dtype."""
    tf = tf_runtime.import_tf()
    if isinstance(dtype, str):
        name = dtype
    elif hasattr(dtype, "as_numpy_dtype"):  # a tf.DType
        name = dtype.name
    else:
        name = np.dtype(dtype).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}.")
    return tf.as_dtype(name)


def _topology(process_index, process_count, local_device_count):
    """Fills unset topology values from JAX (imported only when needed)."""
    if None in (process_index, process_count, local_device_count):
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if local_device_count is None:
            local_device_count = jax.local_device_count()
    return process_index, process_count, local_device_count


def dataset_info(
    dataset: str | sources.Source,
    data_dir: str | None = None,
    *,
    eval_split: str | None = None,
    manual_dir: str | None = None,
    prepare: bool | None = None,
) -> DatasetInfo:
    """Class count and split sizes of a dataset.

    Args:
      dataset: 'digits', 'imagenet2012', 'tfds:<name>', 'folder:<path>' or a Source.
      data_dir: TFDS data directory.
      eval_split: evaluation split (None: the dataset's default, e.g. 'validation').
      manual_dir: imagenet2012 manual download directory.
      prepare: build a TFDS dataset that is not prepared yet (None: only when this is the
        only JAX process, so hosts of a multi-host run never race to prepare).

    Returns:
      A `DatasetInfo`.
    """
    if prepare is None:
        prepare = _topology(0, None, 1)[1] == 1
    source = sources.get_source(dataset, data_dir, manual_dir=manual_dir, prepare=prepare)
    split = eval_split or source.default_eval_split
    return DatasetInfo(
        source.num_classes,
        source.num_examples(source.train_split),
        source.num_examples(split),
        split,
        source.eval_margin,
        getattr(source, "class_names", None),
    )


def _finalize(images, dtype, layout: sharding.BatchLayout, size: int):
    tf = tf_runtime.import_tf()
    images = preprocess.normalize(images, dtype)
    return tf.reshape(images, [layout.local_device_count, layout.per_device_batch, size, size, 3])


def _numpy_batches(ds, on_error) -> Iterator[dict]:
    """Iterates a tf.data pipeline as numpy, turning decode failures into clear errors."""
    tf = tf_runtime.import_tf()
    iterator = iter(ds.as_numpy_iterator())
    for step in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            on_error(step, e)
            raise
        yield batch


def _raise_undecodable(source, split: str, indices_of_batch, error):
    """Names the file behind a decode failure (folder datasets), else re-raises."""
    if not (isinstance(source, sources.IndexSource) and source.is_files(split)):
        return
    culprit = source.find_undecodable(split, indices_of_batch())
    if culprit:
        raise sources.UndecodableImageError(
            f"Cannot decode image file {culprit}. Remove or replace this file "
            f"(dataset {source.name!r}, split {split!r})."
        ) from error


def _mix_and_randaugment(
    step, images, labels, config: AugmentConfig, mix_seed, randaug_seed, per_host: int
):
    """MixUp / CutMix on the doubled batch, then RandAugment per image, seeded by the step."""
    tf = tf_runtime.import_tf()
    if config.mixing:
        images, labels = mixing.mix_doubled_batch(
            images,
            labels,
            tf.random.experimental.stateless_fold_in(mix_seed, step),
            mixup_alpha=config.mixup_alpha,
            use_cutmix=config.cutmix,
        )
    if config.randaugment_layers > 0:
        step_seed = tf.random.experimental.stateless_fold_in(randaug_seed, step)
        seeds = tf.random.experimental.stateless_split(step_seed, per_host)
        images = tf.map_fn(
            lambda args: augment_lib.randaugment(
                args[0], config.randaugment_layers, config.randaugment_magnitude, args[1]
            ),
            (images, seeds),
            fn_output_signature=tf.float32,
        )
    return images, labels


def train_iterator(
    dataset: str | sources.Source,
    *,
    data_dir: str | None = None,
    global_batch_size: int,
    image_size: int,
    dtype="float32",
    augment=None,
    seed: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    num_threads: int | None = None,
    manual_dir: str | None = None,
    prefetch: int = 2,
) -> Iterator[dict]:
    """Infinite, deterministic, resumable training batches for this host.

    With MixUp/CutMix each step reads a doubled batch (2 examples per delivered image).
    Resuming with `start_step` reproduces the uninterrupted stream as long as the dataset,
    seed, batch size, topology and augment config are unchanged.

    Args:
      dataset: 'digits', 'imagenet2012', 'tfds:<name>', 'folder:<path>' or a Source.
      data_dir: TFDS data directory.
      global_batch_size: batch over all hosts and devices; must divide by
        process_count * local_device_count.
      image_size: train px (S).
      dtype: image dtype, float32 or bfloat16.
      augment: `AugmentConfig` or a mapping of its fields (None: no augmentation; see
        `default_augment`).
      seed: data seed; the stream is a function of (seed, process_index).
      start_step: first step to produce (resuming yields the same batches as not stopping).
      process_index, process_count, local_device_count: topology (None: from JAX).
      num_threads: private tf.data thread pool size (None: all cores but one).
      manual_dir: imagenet2012 manual download directory.
      prefetch: batches prepared ahead on the host.

    Returns:
      Iterator of {"images", "labels"} numpy dicts.
    """
    tf = tf_runtime.import_tf()
    process_index, process_count, local_device_count = _topology(
        process_index, process_count, local_device_count
    )
    layout = sharding.batch_layout(global_batch_size, process_count, local_device_count)
    config = _as_augment_config(augment)
    tf_dtype = _tf_dtype(dtype)
    source = sources.get_source(
        dataset, data_dir, manual_dir=manual_dir, prepare=process_count == 1
    )
    split = source.train_split
    per_host = layout.per_host_batch
    if config.mixing and per_host < 2:
        raise ValueError("MixUp/CutMix need a per-host batch of at least 2.")
    per_step = 2 * per_host if config.mixing else per_host
    epoch_size = source.host_num_examples(split, process_index, process_count)
    start_epoch, offset = sharding.resume_position(start_step, per_step, epoch_size)

    example_seed = tf_runtime.stream_seed(seed, process_index, 1)
    mix_seed = tf_runtime.stream_seed(seed, process_index, 2)
    randaug_seed = tf_runtime.stream_seed(seed, process_index, 3)
    num_classes = source.num_classes

    def example_fn(position, record):
        image = preprocess.train_image(
            record["image"],
            image_size,
            tf.random.experimental.stateless_fold_in(example_seed, position),
            random_crop=config.random_crop,
            flip=config.flip,
        )
        label = tf.one_hot(record["label"], num_classes, dtype=tf.float32)
        return image, label

    def batch_fn(step, batch):
        images, labels = _mix_and_randaugment(
            step, *batch, config, mix_seed, randaug_seed, per_host
        )
        labels = tf.reshape(labels, [local_device_count, layout.per_device_batch, num_classes])
        return {"images": _finalize(images, tf_dtype, layout, image_size), "labels": labels}

    records = source.train_records(process_index, process_count, seed, start_epoch)
    ds = records.enumerate(start=start_epoch * epoch_size).skip(offset)
    ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_step, drop_remainder=True)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start_step, 2**62), ds)
    ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(prefetch).with_options(tf_runtime.dataset_options(num_threads))

    def indices_of_batch_at(step_in_run):
        if not isinstance(source, sources.IndexSource):
            return []
        first = (start_step + step_in_run) * per_step
        epoch, off = divmod(first, epoch_size)
        stream = source.train_indices(process_index, process_count, seed, epoch)
        # Errors surface in order, but look two batches further in case of a prefetch race.
        return stream.skip(off).take(3 * per_step).as_numpy_iterator()

    return _numpy_batches(
        ds, lambda step, e: _raise_undecodable(source, split, lambda: indices_of_batch_at(step), e)
    )


def eval_iterator(
    dataset: str | sources.Source,
    *,
    data_dir: str | None = None,
    split: str | None = None,
    global_batch_size: int,
    image_size: int,
    dtype="float32",
    margin: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    num_threads: int | None = None,
    manual_dir: str | None = None,
    prefetch: int = 2,
) -> Iterator[dict]:
    """One pass over an evaluation split; every example appears exactly once over all hosts.

    Each host reads a contiguous shard; all hosts yield the same number of batches (the
    largest shard decides) and padded examples carry mask 0.

    Args:
      dataset: 'digits', 'imagenet2012', 'tfds:<name>', 'folder:<path>' or a Source.
      data_dir: TFDS data directory.
      split: split to evaluate (None: the dataset's default evaluation split).
      global_batch_size: batch over all hosts and devices; must divide by
        process_count * local_device_count.
      image_size: test px (S). Images are squash-resized (bicubic) to (S + margin)^2 and
        centre-cropped to S^2.
      dtype: image dtype, float32 or bfloat16.
      margin: resize margin (None: 32, or 0 for digits).
      process_index, process_count, local_device_count: topology (None: from JAX).
      num_threads: private tf.data thread pool size (None: all cores but one).
      manual_dir: imagenet2012 manual download directory.
      prefetch: batches prepared ahead on the host.

    Returns:
      Finite iterator of {"images", "labels", "mask"} numpy dicts.
    """
    tf = tf_runtime.import_tf()
    process_index, process_count, local_device_count = _topology(
        process_index, process_count, local_device_count
    )
    layout = sharding.batch_layout(global_batch_size, process_count, local_device_count)
    tf_dtype = _tf_dtype(dtype)
    source = sources.get_source(
        dataset, data_dir, manual_dir=manual_dir, prepare=process_count == 1
    )
    split = split or source.default_eval_split
    margin = source.eval_margin if margin is None else margin
    per_host = layout.per_host_batch
    num_batches = sharding.eval_num_batches(source.num_examples(split), process_count, per_host)
    host_count = source.host_num_examples(split, process_index, process_count)

    def example_fn(record):
        return (
            preprocess.eval_image(record["image"], image_size, margin),
            tf.cast(record["label"], tf.int32),
            tf.constant(1.0),
        )

    padding = tf.data.Dataset.from_tensors(
        (tf.zeros([image_size, image_size, 3]), tf.constant(0, tf.int32), tf.constant(0.0))
    )
    padding = padding.repeat(num_batches * per_host - host_count)

    def batch_fn(images, labels, mask):
        shape = [local_device_count, layout.per_device_batch]
        return {
            "images": _finalize(images, tf_dtype, layout, image_size),
            "labels": tf.reshape(labels, shape),
            "mask": tf.reshape(mask, shape),
        }

    ds = source.records(split, process_index, process_count)
    ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE).concatenate(padding)
    ds = ds.batch(per_host, drop_remainder=True).map(batch_fn)
    ds = ds.prefetch(prefetch).with_options(tf_runtime.dataset_options(num_threads))

    def indices_of_batch_at(step):
        start, end = sharding.host_range(source.num_examples(split), process_index, process_count)
        return range(start + step * per_host, min(end, start + (step + 3) * per_host))

    return _numpy_batches(
        ds, lambda step, e: _raise_undecodable(source, split, lambda: indices_of_batch_at(step), e)
    )
