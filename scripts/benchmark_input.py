"""Benchmarks the training input pipeline: images/s per CPU core at the F0 train size.

  python scripts/benchmark_input.py                     # synthetic JPEG folder, 192 px
  python scripts/benchmark_input.py --threads 1,2,4,8 --batches 30
  python scripts/benchmark_input.py --dataset imagenet2012 --data_dir ~/tensorflow_datasets

Prints a markdown table: one row per augmentation config and thread count.
"""

import argparse
import os
import tempfile

from nfnets_jax.data import benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name; default: a synthetic folder of JPEGs in a temp dir",
    )
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    parser.add_argument(
        "--configs",
        default=",".join(benchmark.CONFIGS),
        help=f"comma-separated subset of {list(benchmark.CONFIGS)}",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or benchmark.write_synthetic_jpegs(tmp, args.num_images)
        rows = []
        for name in args.configs.split(","):
            for threads in sorted({int(t) for t in args.threads.split(",")}):
                result = benchmark.measure(
                    dataset,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    augment=benchmark.CONFIGS[name],
                    num_threads=threads,
                    batches=args.batches,
                    data_dir=args.data_dir,
                )
                rows.append(dict(config=name, threads=threads, **result))
                print(
                    f"{name}, {threads} threads: {result['images_per_s']:.0f} images/s", flush=True
                )
    print(f"\n{args.image_size} px, batch {args.batch_size}, {os.cpu_count()} CPU cores\n")
    print(benchmark.format_table(rows))


if __name__ == "__main__":
    main()
