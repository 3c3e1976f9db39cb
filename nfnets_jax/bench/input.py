"""Throughput of the training input pipeline, in images per second per CPU core.

`write_synthetic_jpegs` makes a class-folder dataset of ImageNet-sized JPEGs (smooth
gradients plus noise, quality 90, ~500x375 px, like the average ImageNet photo) so the
benchmark needs no download; `measure` times the real `train_iterator` on any dataset.
"""

import os
import time

import numpy as np

from nfnets_jax.data import pipeline

CONFIGS = {
    "crop+flip": pipeline.AugmentConfig(True, True, 0, 0.0, 0.0, False),
    "+mixup/cutmix": pipeline.AugmentConfig(True, True, 0, 0.0, 0.2, True),
    "+randaugment 4x5 (F0)": pipeline.PAPER_F0,
}


def write_synthetic_jpegs(
    root: str,
    num_images: int,
    num_classes: int = 4,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> str:
    """Writes `root/train/class_k/*.jpg` and returns the dataset name 'folder:<root>'."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    rng = np.random.RandomState(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(num_images):
        class_dir = os.path.join(root, "train", f"class_{i % num_classes}")
        os.makedirs(class_dir, exist_ok=True)
        freq = rng.uniform(0.005, 0.05, size=3)
        phase = rng.uniform(0, 6.3, size=3)
        base = [127 + 100 * np.sin(freq[c] * (xx + yy * (c + 1)) + phase[c]) for c in range(3)]
        image = np.stack(base, axis=-1) + rng.normal(0, 12, (height, width, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(class_dir, f"{i}.jpg"), quality=90)
    return f"folder:{root}"


def measure(
    dataset: str,
    *,
    image_size: int,
    batch_size: int,
    augment: pipeline.AugmentConfig,
    num_threads: int,
    batches: int = 20,
    warmup_batches: int = 3,
    data_dir: str | None = None,
) -> dict:
    """Images per second delivered by `train_iterator` on one host.

    Args:
      dataset: dataset name (see `pipeline.train_iterator`).
      image_size: train px.
      batch_size: per-host batch.
      augment: augmentation config.
      num_threads: tf.data private thread pool size (the cores it may use).
      batches: timed batches.
      warmup_batches: untimed batches first (graph building, thread start-up).
      data_dir: TFDS data directory.

    Returns:
      dict with images_per_s (delivered, wall clock), decoded_per_s (examples read; twice
      as many with MixUp/CutMix), per_core (images_per_s / num_threads) and
      per_cpu_second (images per CPU-second the process used: the per-core cost, robust
      to other load on the machine).
    """
    iterator = pipeline.train_iterator(
        dataset,
        data_dir=data_dir,
        global_batch_size=batch_size,
        image_size=image_size,
        dtype="bfloat16",
        augment=augment,
        seed=0,
        process_index=0,
        process_count=1,
        local_device_count=1,
        num_threads=num_threads,
    )
    for _ in range(warmup_batches):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    images_per_s = batches * batch_size / elapsed
    return dict(
        images_per_s=images_per_s,
        decoded_per_s=images_per_s * (2 if augment.mixing else 1),
        per_core=images_per_s / num_threads,
        per_cpu_second=batches * batch_size / cpu_seconds,
    )


def format_table(rows: list[dict]) -> str:
    """Markdown table of `measure` results (rows also carry config and threads)."""
    lines = [
        "| config | threads | images/s | decoded/s | images/s per thread | images per CPU-second |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['threads']} | {r['images_per_s']:.0f} | "
            f"{r['decoded_per_s']:.0f} | {r['per_core']:.0f} | "
            f"{r['per_cpu_second']:.0f} |"
        )
    return "\n".join(lines)
