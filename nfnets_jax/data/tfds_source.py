"""TFDS datasets as sources: `imagenet2012` and `tfds:<name>` (see `sources.get_source`).

`TfdsSource` reads a TFDS image-classification dataset through its supervised keys (JPEGs
stay encoded so the pipeline decodes only the crop window). A host's training stream splits
its shard into contiguous chunks, merges them in a seeded random order each epoch and passes
the result through a seeded shuffle buffer (TFDS also shuffles examples when it writes its
files). `prepare_tfds` builds a dataset once, with a clear error listing the missing archives
of an incomplete ImageNet manual download.
"""

import dataclasses
import os
import typing

import numpy as np

from nfnets_jax.data import sharding, tf_runtime

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
TFDS_SHUFFLE_BUFFER = 16384
TFDS_CHUNKS = 32


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
        names = getattr(info.features[self.label_key], "names", None)
        self.class_names = tuple(names) if names else None
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
        base = tf_runtime.stream_seed(seed, process_index, 0)

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


def builder(name: str, data_dir: str | None, manual_dir: str | None, prepare: bool):
    """The TFDS builder of `name`: prepared here when `prepare`, else it must be prepared.

    Raises:
      FileNotFoundError: not prepared and `prepare` is off (a multi-host run), or
        imagenet2012's manual download is incomplete.
    """
    if prepare:
        return prepare_tfds(name, data_dir, manual_dir)
    tf_runtime.import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    found = tfds.builder(name, data_dir=data_dir)
    if not found.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {found.data_dir!r}. Prepare it once "
            "from a single process (nfnets_jax.data.tfds_source.prepare_tfds) before a "
            "multi-host run."
        )
    return found
