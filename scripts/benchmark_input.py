"""Benchmarks the training input pipeline: images/s per CPU core at the F0 train size.

  python scripts/benchmark_input.py                     # synthetic JPEG folder, 192 px
  python scripts/benchmark_input.py --threads=1,2,4,8 --batches=30
  python scripts/benchmark_input.py --dataset=imagenet2012 --data_dir=~/tensorflow_datasets

Prints a markdown table: one row per augmentation config and thread count. Logic:
nfnets_jax/bench/input.py.
"""

import os
import tempfile

from absl import app, flags

from nfnets_jax.bench import input as input_bench

_DATASET = flags.DEFINE_string(
    "dataset", None, "Dataset name; default: a synthetic folder of JPEGs in a temp dir."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Synthetic images to write.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 192, "Train px.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Per-host batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches.")
_THREADS = flags.DEFINE_list("threads", ["1", str(os.cpu_count())], "tf.data thread counts.")
_CONFIGS = flags.DEFINE_list(
    "configs", list(input_bench.CONFIGS), f"Subset of {list(input_bench.CONFIGS)}."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = sorted(set(_CONFIGS.value) - set(input_bench.CONFIGS))
    if unknown:
        raise app.UsageError(f"Unknown --configs {unknown}; valid: {list(input_bench.CONFIGS)}.")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _DATASET.value or input_bench.write_synthetic_jpegs(tmp, _NUM_IMAGES.value)
        rows = []
        for name in _CONFIGS.value:
            for threads in sorted({int(t) for t in _THREADS.value}):
                result = input_bench.measure(
                    dataset,
                    image_size=_IMAGE_SIZE.value,
                    batch_size=_BATCH.value,
                    augment=input_bench.CONFIGS[name],
                    num_threads=threads,
                    batches=_BATCHES.value,
                    data_dir=_DATA_DIR.value,
                )
                rows.append(dict(config=name, threads=threads, **result))
                print(
                    f"{name}, {threads} threads: {result['images_per_s']:.0f} images/s", flush=True
                )
    print(f"\n{_IMAGE_SIZE.value} px, batch {_BATCH.value}, {os.cpu_count()} CPU cores\n")
    print(input_bench.format_table(rows))


if __name__ == "__main__":
    app.run(main)
