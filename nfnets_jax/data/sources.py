"""Dataset sources: where examples come from, and which ones each host reads.

Names accepted by `get_source`:
  * `digits`: scikit-learn's handwritten digits (1797 8x8 grayscale images, 10 classes),
    shipped with scikit-learn, no download. Fixed split: a seeded permutation
    (`np.random.RandomState(0)`), the last 360 examples are `test`, the other 1437 `train`.
    Kept in memory as uint8 RGB.
  * `imagenet2012`: the TFDS builder, prepared from the user's manual download
    (`tfds_source`).
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
from absl import logging

from nfnets_jax.data import sharding, tf_runtime, tfds_source

DIGITS_NUM_TEST = 360
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class UndecodableImageError(ValueError):
    """An image file of a folder dataset could not be decoded."""


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
      class_names: the name of each class id, when known.
    """

    name: str
    num_classes: int
    splits: dict
    train_split: str = "train"
    default_eval_split: str = "test"
    eval_margin: int = 32
    class_names: tuple[str, ...] | None = None

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
        base = tf_runtime.stream_seed(seed, process_index, 0)

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
        class_names=tuple(str(d) for d in range(10)),
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
    if not classes:
        raise ValueError(
            f"Folder dataset {os.path.join(path, reference)!r} has no class sub-folders: put "
            f"each class's images in a folder of its own, e.g. {reference}/cat/1.jpg."
        )
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
            if not found:
                logging.warning(
                    "Class folder %r has no images (%s); it is still class %d of %d.",
                    entry.path,
                    "/".join(IMAGE_EXTENSIONS),
                    class_ids[entry.name],
                    len(classes),
                )
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
        class_names=tuple(classes),
    )


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
        builder = tfds_source.builder(name, data_dir, manual_dir, prepare)
        return tfds_source.TfdsSource(name=dataset, builder=builder)
    raise ValueError(
        f"Unknown dataset {dataset!r}: use 'digits', 'imagenet2012', "
        "'tfds:<name>' or 'folder:<path>'."
    )
