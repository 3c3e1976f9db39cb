r"""Times every distinct convolution of an NFNet (forward + backward), per `conv_grad`
implementation and optionally in PyTorch, and sums them weighted by how often they occur.

  # F0's convolutions at the CPU training benchmark's size (docs/performance.md):
  python scripts/benchmark_layers.py --variant=F0 --batch_size=8 --resolution=128 \
      --conv_grad=xla,matmul --compare=torch --repeats=9 --iters=5

Logic and what exactly is timed: nfnets_jax/bench/layers.py.
"""

import json

from absl import app, flags

from nfnets_jax import files
from nfnets_jax.bench import layers as layer_bench
from nfnets_jax.bench import step
from nfnets_jax.models import layers

_VARIANT = flags.DEFINE_string("variant", "F0", "NFNet variant.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_RESOLUTION = flags.DEFINE_integer("resolution", 128, "Square image size of the model.")
_GROUP_CONV = flags.DEFINE_string("group_conv", "auto", "Grouped-conv strategy.")
_CONV_GRAD = flags.DEFINE_list(
    "conv_grad", ["xla", "matmul"], "Convolution backward passes to compare."
)
_COMPARE = flags.DEFINE_enum("compare", None, ["torch"], "Also time PyTorch's conv2d.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per layer (median reported).")
_ITERS = flags.DEFINE_integer("iters", 5, "Back-to-back calls per timed run.")
_MODEL_KWARGS = flags.DEFINE_string("model_kwargs", "{}", "Extra NFNet arguments as JSON.")
_JSON = flags.DEFINE_string("json", None, "Also write the full result as JSON here.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = step.BenchmarkConfig(
            variant=_VARIANT.value,
            batch_size=_BATCH.value,
            train_resolution=_RESOLUTION.value,
            group_conv=_GROUP_CONV.value,
            model_kwargs=json.loads(_MODEL_KWARGS.value),
        )
        for impl in _CONV_GRAD.value:
            layers.resolve_conv_grad(impl)
    except (ValueError, json.JSONDecodeError) as err:
        raise app.UsageError(str(err)) from err
    result = layer_bench.run(
        config, _CONV_GRAD.value, _COMPARE.value == "torch", _REPEATS.value, iters=_ITERS.value
    )
    print(
        f"{config.variant}, batch {config.batch_size} @ {config.train_resolution} px, "
        f"group_conv={config.group_conv}: forward + backward per convolution"
    )
    print(layer_bench.format_table(result))
    if _JSON.value:
        files.write_json(_JSON.value, result, indent=1)


if __name__ == "__main__":
    app.run(main)
