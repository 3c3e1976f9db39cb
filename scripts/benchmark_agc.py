"""Benchmarks AGC and the reference optimizer update on a real NFNet parameter tree.

  python scripts/benchmark_agc.py                        # F0, batch 8, 128 px, on CPU
  python scripts/benchmark_agc.py --notrain_step         # optimizer timings only
  python scripts/benchmark_agc.py --batch_size=8 --image_size=128 --repeats=10

What is timed, and how: nfnets_jax/bench/agc.py.
"""

from absl import app, flags

from nfnets_jax.bench import agc

_VARIANT = flags.DEFINE_string("variant", "F0", "NFNet variant.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per training step.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Training step resolution.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds (the median is reported).")
_TRAIN_STEP = flags.DEFINE_bool("train_step", True, "Also time the forward + backward pass.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = agc.run(
        _VARIANT.value,
        _BATCH.value,
        _IMAGE_SIZE.value,
        _REPEATS.value,
        train_step=_TRAIN_STEP.value,
    )
    print(agc.format_table(result))


if __name__ == "__main__":
    app.run(main)
