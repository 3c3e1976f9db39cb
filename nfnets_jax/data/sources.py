"""Dataset sources: where examples come from, and which ones each host reads.

Names accepted by `get_source`:
  * `digits`: scikit-learn's handwritten digits (1797 8x8 grayscale images, 10 classes),
    shipped with scikit-learn, no download. Fixed split: a seeded permutation
    (`np.random.RandomState(0)`), the last 360 examples are `test`, the other 1437 `train`.
    Kept in memory as uint8 RGB.
  * `imagenet2012`: the TFDS builder, prepared from the user's manual download.
  * `tfds:<name>`: any TFDS image-classification dataset (its supervised keys are used).
    Asking for a split it lacks (e.g. the default eval split 'validation' of a dataset with
    only 'train') raises a ValueError naming the dataset, the split and the splits it has.
  * `folder:<path>`: `<path>/train/<class>/<image>` plus `<path>/val/...` or
    `<path>/test/...`; class ids are the sorted class folder names of `train/`.

Every source yields records `{"image", "label"}` where `image` is either encoded bytes
(JPEG stays undecoded so the pipeline can decode only the crop window) or a uint8 array.
Host shards are contiguous, disjoint slices of the split (`sharding.host_range`).

Train streams are infinite and deterministic given (seed, process_index): epoch `e` of a
host is its shard in an order seeded by (seed, process_index, e). In-memory and folder
sources use an exact stateless permutation of the shard; TFDS sources split the shard into
contiguous chunks, merge them in a seeded random order and pass the result through a
seeded shuffle buffer (TFDS also shuffles examples when it writes its files). A stream can
start at any epoch.
"""

import dataclasses
import os
import typing

import numpy as np

from nfnets_jax.data import sharding, tf_runtime

DIGITS_NUM_TEST = 360
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
TFDS_SHUFFLE_BUFFER = 16384
TFDS_CHUNKS = 32


class UndecodableImageError(ValueError):
    """An image file of a folder dataset could not be decoded."""


def stream_seed(seed: int, process_index: int, stream: int):
    """Stateless [2] seed for one random stream (orders, crops, mixing...) of one host."""
    tf = tf_runtime.import_tf()
    base = tf.constant([seed, process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, stream)


class Source(typing.Protocol):
    """What the pipeline needs from a dataset."""

    name: str
    num_classes: int
    train_split: str
    default_eval_split: str
    eval_margin: int

    def num_examples(self, split: str) -> int:
        """Examples in a split."""

    def records(self, split: str, process_index: int, process_count: int):
        """This host's shard of a split, in a fixed order (a finite tf.data.Dataset)."""

    def train_records(self, process_index: int, process_count: int, seed: int, start_epoch: int):
        """Infinite train stream of this host, starting at `start_epoch`."""

    def host_num_examples(self, split: str, process_index: int, process_count: int) -> int:
        """Examples in this host's shard."""


@dataclasses.dataclass
class IndexSource:
    """A source whose examples are addressable by index: in-memory arrays or file paths.

    Attributes:
      name: dataset name.
      num_classes: number of classes.
      splits: split name -> (items, labels); items are uint8 [N, H, W, 3] arrays or an
        array of file paths (str).
      train_split: name of the training split.
      default_eval_split: split evaluated by default.
      eval_margin: resize margin of the evaluation protocol (32 for photos; 0 for digits,
        whose 8x8 images leave nothing to crop).
    """

    name: str
    num_classes: int
    splits: dict
    train_split: str = "train"
    default_eval_split: str = "test"
    eval_margin: int = 32

    def _split(self, split: str):
        if split not in self.splits:
            raise ValueError(
                f"Dataset {self.name!r} has no split {split!r}; available: {sorted(self.splits)}."
            )
        return self.splits[split]

    def num_examples(self, split: str) -> int:
        return len(self._split(split)[1])

    def host_num_examples(self, split: str, process_index: int, process_count: int) -> int:
        start, end = sharding.host_range(self.num_examples(split), process_index, process_count)
        return end - start

    def is_files(self, split: str) -> bool:
        return self._split(split)[0].dtype.kind in "US"

    def _loader(self, split: str):
        """index -> record, as a tf function over constants of the split."""
        tf = tf_runtime.import_tf()
        items, labels = self._split(split)
        labels = tf.constant(labels, tf.int64)
        if self.is_files(split):
            paths = tf.constant(items.astype(str))
            return lambda i: {
                "image": tf.io.read_file(tf.gather(paths, i)),
                "label": tf.gather(labels, i),
            }
        images = tf.constant(items, tf.uint8)
        return lambda i: {"image": tf.gather(images, i), "label": tf.gather(labels, i)}

    def records(self, split: str, process_index: int, process_count: int):
        tf = tf_runtime.import_tf()
        indices = sharding.host_indices(self.num_examples(split), process_index, process_count)
        return tf.data.Dataset.from_tensor_slices(indices).map(self._loader(split))

    def train_indices(self, process_index: int, process_count: int, seed: int, start_epoch: int):
        """Infinite stream of example indices: one seeded permutation of the shard per epoch."""
        tf = tf_runtime.import_tf()
        indices = tf.constant(
            sharding.host_indices(self.num_examples(self.train_split), process_index, process_count)
        )
        base = stream_seed(seed, process_index, 0)

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                indices, seed=tf.random.experimental.stateless_fold_in(base, e)
            )
            return tf.data.Dataset.from_tensor_slices(order)

        return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)

    def train_records(self, process_index: int, process_count: int, seed: int, start_epoch: int):
        stream = self.train_indices(process_index, process_count, seed, start_epoch)
        return stream.map(self._loader(self.train_split))

    def find_undecodable(self, split: str, indices: typing.Iterable[int]) -> str | None:
        """First file among `indices` that TensorFlow cannot decode, with the reason."""
        tf = tf_runtime.import_tf()
        items, _ = self._split(split)
        for i in indices:
            path = str(items[int(i)])
            try:
                tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                return f"{path}: {e.message.splitlines()[0] if e.message else type(e).__name__}"
        return None


def load_digits() -> IndexSource:
    """scikit-learn's handwritten digits with a fixed 1437 / 360 train / test split."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    train, test = order[:-DIGITS_NUM_TEST], order[-DIGITS_NUM_TEST:]
    return IndexSource(
        name="digits",
        num_classes=10,
        splits={"train": (images[train], labels[train]), "test": (images[test], labels[test])},
        eval_margin=0,
    )


def _list_images(class_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(class_dir):
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def load_folder(path: str) -> IndexSource:
    """A directory of class sub-folders: `path/{train,val,test}/<class>/<images>`.

    Raises:
      FileNotFoundError: if `path` has none of the split folders.
      ValueError: if an evaluation split has a class folder that `train/` lacks.
    """
    path = os.path.expanduser(path)
    split_names = [
        s for s in ("train", "val", "validation", "test") if os.path.isdir(os.path.join(path, s))
    ]
    if not split_names:
        raise FileNotFoundError(
            f"Folder dataset {path!r} needs sub-folders train/ and val/ (or test/), each with "
            "one folder of images per class, e.g. train/cat/1.jpg."
        )
    reference = "train" if "train" in split_names else split_names[0]
    classes = sorted(d.name for d in os.scandir(os.path.join(path, reference)) if d.is_dir())
    class_ids = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in split_names:
        files, labels = [], []
        for entry in sorted(os.scandir(os.path.join(path, split)), key=lambda d: d.name):
            if not entry.is_dir():
                continue
            if entry.name not in class_ids:
                raise ValueError(
                    f"Class folder {entry.path!r} does not exist in "
                    f"{os.path.join(path, reference)!r}; class ids come from there."
                )
            found = _list_images(entry.path)
            files.extend(found)
            labels.extend([class_ids[entry.name]] * len(found))
        files, labels = np.array(files, dtype=str), np.array(labels, dtype=np.int64)
        if split == "train":
            # Mix classes before hosts take contiguous shards (fixed seed: same on every host).
            order = np.random.RandomState(0).permutation(len(labels))
            files, labels = files[order], labels[order]
        splits[split] = (files, labels)
    # Never stand one split in for another: training on the eval images (or evaluating on the
    # training images) would be silently wrong. A missing split errors when it is used.
    eval_split = next((s for s in ("val", "validation", "test") if s in splits), "val")
    return IndexSource(
        name=f"folder:{path}",
        num_classes=len(classes),
        splits=splits,
        train_split="train",
        default_eval_split=eval_split,
    )


@dataclasses.dataclass
class TfdsSource:
    """A TFDS image-classification dataset (image and label from its supervised keys)."""

    name: str
    builder: typing.Any
    train_split: str = "train"
    eval_margin: int = 32
    shuffle_buffer: int = TFDS_SHUFFLE_BUFFER
    num_chunks: int = TFDS_CHUNKS

    def __post_init__(self):
        info = self.builder.info
        keys = info.supervised_keys or ("image", "label")
        self.image_key, self.label_key = keys[0], keys[1]
        self.num_classes = info.features[self.label_key].num_classes
        image_feature = info.features[self.image_key]
        self.encoded_jpeg = getattr(image_feature, "encoding_format", None) == "jpeg"
        self._counts = {}

    @property
    def default_eval_split(self) -> str:
        splits = self.builder.info.splits
        return "validation" if "validation" in splits or "test" not in splits else "test"

    def _as_dataset(self, split: str, files_in_parallel: int | None = None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded_jpeg else None
        read_config = tfds.ReadConfig(add_tfds_id=False)
        if files_in_parallel:
            read_config = tfds.ReadConfig(
                add_tfds_id=False, interleave_cycle_length=files_in_parallel
            )
        # shuffle_files=False keeps TFDS's file interleave deterministic.
        ds = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=decoders, read_config=read_config
        )
        return ds.map(
            lambda ex: {
                "image": ex[self.image_key],
                "label": tf_runtime.import_tf().cast(ex[self.label_key], "int64"),
            }
        )

    def check_split(self, split: str) -> None:
        """Raises a ValueError naming the dataset, the missing split and the available ones if
        `split` (or a part of a TFDS split expression like 'train[:90%]+test') does not exist."""
        available = sorted(self.builder.info.splits or {})
        if not available:  # Unknown, e.g. under tfds.testing.mock_data: TFDS decides.
            return
        for part in split.split("+"):
            name = part.split("[", 1)[0].strip()
            if name not in available and name != "all":
                hint = (
                    ""
                    if split == self.train_split
                    else (
                        " Evaluate another split: set eval_split (--config.eval_split=<split> for "
                        "the trainer, `split=` of pipeline.eval_iterator)."
                    )
                )
                raise ValueError(
                    f"TFDS dataset {self.name!r} has no split {name!r}; available "
                    f"splits: {', '.join(available)}.{hint}"
                )

    def num_examples(self, split: str) -> int:
        if split not in self._counts:
            self.check_split(split)
            known = (
                self.builder.info.splits[split].num_examples
                if split in (self.builder.info.splits or {})
                else 0
            )
            if not known:  # e.g. under tfds.testing.mock_data: ask the dataset itself.
                known = int(self._as_dataset(split).cardinality())
            if known < 0:
                raise ValueError(f"Cannot tell the size of split {split!r} of {self.name!r}.")
            self._counts[split] = known
        return self._counts[split]

    def _host_split(self, split: str, process_index: int, process_count: int) -> str:
        start, end = sharding.host_range(self.num_examples(split), process_index, process_count)
        return f"{split}[{start}:{end}]"

    def host_num_examples(self, split: str, process_index: int, process_count: int) -> int:
        host_split = self._host_split(split, process_index, process_count)
        return int(self._as_dataset(host_split).cardinality())

    def records(self, split: str, process_index: int, process_count: int):
        return self._as_dataset(self._host_split(split, process_index, process_count))

    def train_records(self, process_index: int, process_count: int, seed: int, start_epoch: int):
        tf = tf_runtime.import_tf()
        start, end = sharding.host_range(
            self.num_examples(self.train_split), process_index, process_count
        )
        # The shard is read as `num_chunks` contiguous pieces, merged in a seeded random
        # order each epoch, then through a seeded shuffle buffer: every epoch gets a new order
        # with sequential file reads.
        num_chunks = max(1, min(self.num_chunks, end - start))
        bounds = [start + (end - start) * i // num_chunks for i in range(num_chunks + 1)]
        chunks = [
            self._as_dataset(f"{self.train_split}[{a}:{b}]", files_in_parallel=4)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        chunk_ids = tf.constant(np.repeat(np.arange(num_chunks, dtype=np.int64), np.diff(bounds)))
        base = stream_seed(seed, process_index, 0)

        def epoch(e):
            order_seed, shuffle_seed = tf.unstack(
                tf.random.experimental.stateless_split(
                    tf.random.experimental.stateless_fold_in(base, e), 2
                )
            )
            choice = tf.random.experimental.stateless_shuffle(chunk_ids, seed=order_seed)
            merged = tf.data.Dataset.choose_from_datasets(
                chunks, tf.data.Dataset.from_tensor_slices(choice)
            )
            return merged.shuffle(
                self.shuffle_buffer,
                seed=tf.bitwise.bitwise_and(shuffle_seed[0], (1 << 62) - 1),
                reshuffle_each_iteration=False,
            )

        return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)


def imagenet_missing_message(data_dir: str, manual_dir: str, missing: list[str]) -> str:
    return (
        f"imagenet2012 is not prepared in {data_dir!r} and its manual download is incomplete: "
        f"missing {', '.join(missing)} in {manual_dir!r}. Download ILSVRC2012_img_train.tar "
        "(about 138 GB) and ILSVRC2012_img_val.tar (about 6.3 GB) from "
        "https://image-net.org/download-images (free registration) and place both files, "
        f"unchanged, in {manual_dir}/ (or pass manual_dir=...). The first run then prepares "
        "TFDS records in data_dir (hours, once)."
    )


def prepare_tfds(name: str, data_dir: str | None, manual_dir: str | None = None):
    """Builds (if needed) and returns the TFDS builder of `name`.

    For `imagenet2012` the manual download is looked up in `manual_dir` (default
    `<data_dir>/downloads/manual`), and a clear error lists the missing archives.

    Raises:
      FileNotFoundError: imagenet2012 is neither prepared nor manually downloaded.
    """
    tf_runtime.import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    download_config = None
    if name.split("/")[0].split(":")[0] == "imagenet2012":
        root = builder.data_dir_root if hasattr(builder, "data_dir_root") else data_dir
        manual_dir = manual_dir or os.path.join(root, "downloads", "manual")
        missing = [
            f for f in IMAGENET_MANUAL_FILES if not os.path.exists(os.path.join(manual_dir, f))
        ]
        if missing:
            raise FileNotFoundError(imagenet_missing_message(str(root), manual_dir, missing))
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=download_config)
    return builder


def get_source(
    dataset, data_dir: str | None = None, *, manual_dir: str | None = None, prepare: bool = True
) -> Source:
    """Returns the source for a dataset name (see the module docstring).

    Args:
      dataset: 'digits', 'imagenet2012', 'tfds:<name>' or 'folder:<path>'; a `Source`
        object (e.g. an `IndexSource` over your own in-memory arrays) is returned as is.
      data_dir: TFDS data directory (None: TFDS default). Unused for digits and folders.
      manual_dir: where the imagenet2012 manual download lies.
      prepare: build TFDS datasets that are not prepared yet (turn off on multi-host runs,
        where one process must prepare first).

    Raises:
      ValueError: unknown dataset name.
    """
    if not isinstance(dataset, str):
        return dataset
    if dataset == "digits":
        return load_digits()
    if dataset.startswith("folder:"):
        return load_folder(dataset[len("folder:") :])
    if dataset == "imagenet2012" or dataset.startswith("tfds:"):
        name = dataset[len("tfds:") :] if dataset.startswith("tfds:") else dataset
        if prepare:
            builder = prepare_tfds(name, data_dir, manual_dir)
        else:
            tf_runtime.import_tf()
            import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                raise FileNotFoundError(
                    f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it "
                    "once from a single process (nfnets_jax.data.sources.prepare_tfds) before a "
                    "multi-host run."
                )
        return TfdsSource(name=dataset, builder=builder)
    raise ValueError(
        f"Unknown dataset {dataset!r}: use 'digits', 'imagenet2012', "
        "'tfds:<name>' or 'folder:<path>'."
    )
