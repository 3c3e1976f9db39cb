r"""Prints where an NFNet forward+backward (or inference) step spends its time, by op kind.

  # F0 forward + backward on CPU, both convolution backward passes (README "Performance"):
  python scripts/profile_step.py --variant=F0 --batch_size=8 --resolution=128 \
      --conv_grad=xla,matmul

Thunk durations from `jax.profiler`, grouped by `nfnets_jax.profiling.categorize`; they may
overlap (concurrent thunks), so read the shares. Timing comparisons belong to
scripts/benchmark.py, which interleaves its measurements.
"""

import dataclasses
import json

import haiku as hk
import jax
import jax.numpy as jnp
from absl import app, flags

from nfnets_jax import benchmarking, optim, profiling

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


def profile_one(config: benchmarking.BenchmarkConfig, mode: str, iters: int) -> dict:
    transformed = hk.transform(benchmarking.make_forward(config))
    res, rng = config.train_resolution, jax.random.PRNGKey(0)
    images = jax.random.normal(rng, (config.batch_size, res, res, 3))
    params = jax.jit(transformed.init, static_argnums=2)(rng, images, mode == "grad")
    if mode == "inference":
        fn = lambda p, x: transformed.apply(p, None, x, is_training=False)["logits"]
        args = (params, images)
    else:
        optimizer = optim.make_optimizer(learning_rate=0.1)
        fn = benchmarking.make_train_step(transformed, optimizer, jnp.float32, with_update=False)
        labels = jnp.arange(config.batch_size, dtype=jnp.int32) % config.num_classes
        args = (params, optimizer.init(params), images, labels, rng)
    compiled = jax.jit(fn).lower(*args).compile()
    return profiling.profile(compiled, args, iters)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    base = benchmarking.BenchmarkConfig(
        variant=_VARIANT.value,
        batch_size=_BATCH.value,
        train_resolution=_RESOLUTION.value,
        group_conv=_GROUP_CONV.value,
        model_kwargs=json.loads(_MODEL_KWARGS.value),
    )
    for impl in _CONV_GRAD.value:
        config = dataclasses.replace(base, conv_grad=impl)
        result = profile_one(config, _MODE.value, _ITERS.value)
        print(
            profiling.format_profile(
                result,
                f"{config.variant} {_MODE.value}, batch {config.batch_size} @ "
                f"{config.train_resolution} px, group_conv={config.group_conv}, "
                f"conv_grad={impl}",
            )
        )
        print()


if __name__ == "__main__":
    app.run(main)
