r"""Prints where an NFNet forward+backward (or inference) step spends its time, by op kind.

  # F0 forward + backward on CPU, both convolution backward passes (docs/performance.md):
  python scripts/profile_step.py --variant=F0 --batch_size=8 --resolution=128 \
      --conv_grad=xla,matmul

Thunk durations from `jax.profiler`, grouped by `nfnets_jax.bench.profile.categorize`; they may
overlap (concurrent thunks), so read the shares. Timing comparisons belong to
scripts/benchmark.py, which interleaves its measurements.
"""

import dataclasses
import json

from absl import app, flags

from nfnets_jax.bench import profile, step

_VARIANT = flags.DEFINE_string("variant", "F0", "NFNet variant.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_RESOLUTION = flags.DEFINE_integer("resolution", 128, "Square image size.")
_MODE = flags.DEFINE_enum(
    "mode",
    "grad",
    ["grad", "inference"],
    "grad: forward + backward of the training loss; inference.",
)
_GROUP_CONV = flags.DEFINE_string("group_conv", "auto", "Grouped-conv strategy.")
_CONV_GRAD = flags.DEFINE_list("conv_grad", ["auto"], "Backward passes to profile, in turn.")
_ITERS = flags.DEFINE_integer("iters", 2, "Profiled calls (after one untimed call).")
_MODEL_KWARGS = flags.DEFINE_string("model_kwargs", "{}", "Extra NFNet arguments as JSON.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    base = step.BenchmarkConfig(
        variant=_VARIANT.value,
        batch_size=_BATCH.value,
        train_resolution=_RESOLUTION.value,
        inference_resolution=_RESOLUTION.value,
        group_conv=_GROUP_CONV.value,
        model_kwargs=json.loads(_MODEL_KWARGS.value),
    )
    for impl in _CONV_GRAD.value:
        config = dataclasses.replace(base, conv_grad=impl)
        result = profile.profile_mode(config, _MODE.value, _ITERS.value)
        print(
            profile.format_profile(
                result,
                f"{config.variant} {_MODE.value}, batch {config.batch_size} @ "
                f"{config.train_resolution} px, group_conv={config.group_conv}, "
                f"conv_grad={impl}",
            )
        )
        print()


if __name__ == "__main__":
    app.run(main)
