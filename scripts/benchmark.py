r"""Times NFNet inference and training steps, optionally side by side with timm.

  # F0 on CPU against timm's dm_nfnet_f0 (docs/performance.md):
  python scripts/benchmark.py --variant=F0 --batch_size=8 --inference_resolution=192 \
      --train_resolution=128 --compare=timm --repeats=5
  # Convolution backward passes side by side (training step, against timm):
  python scripts/benchmark.py --modes=train --conv_grad=xla,matmul --compare=timm
  # Grouped-convolution strategies side by side, with the optimizer's share:
  python scripts/benchmark.py --group_conv=native,split,dense \
      --modes=init,inference,train,grad,optimizer --json=/tmp/strategies.json
  # bfloat16 on an accelerator, with per-block rematerialisation:
  python scripts/benchmark.py --variant=F3 --batch_size=64 --resolution=320 \
      --dtype=bfloat16 --remat=false,true

All measurements of one invocation are compiled first, then timed round-robin (median of
--repeats rounds). Logic: nfnets_jax/bench/step.py (the trainer's own train step).
"""

import json
import os

from absl import app, flags

from nfnets_jax import files
from nfnets_jax.bench import step, step_report

_VARIANT = flags.DEFINE_string("variant", "F0", "NFNet variant.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_RESOLUTION = flags.DEFINE_integer(
    "resolution", None, "Image size for every mode (overridden by the two flags below)."
)
_INFER_RES = flags.DEFINE_integer(
    "inference_resolution", None, "Image size for init/inference; default 192."
)
_TRAIN_RES = flags.DEFINE_integer(
    "train_resolution", None, "Image size for train/grad/optimizer; default 128."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(step.DTYPES), "Compute dtype.")
_GROUP_CONV = flags.DEFINE_list(
    "group_conv", ["auto"], "Grouped-conv strategies to compare: auto,native,split,dense."
)
_CONV_GRAD = flags.DEFINE_list(
    "conv_grad", ["auto"], "Convolution backward passes to compare: auto,xla,matmul."
)
_REMAT = flags.DEFINE_list(
    "remat", ["false"], "Per-block rematerialisation: false, true or both (false,true)."
)
_DONATE = flags.DEFINE_list(
    "donate",
    ["true"],
    "Donate params and optimizer state to the step: true, false or both (true,false).",
)
_MODES = flags.DEFINE_list("modes", ["inference", "train"], f"Subset of {','.join(step.MODES)}.")
_ITERS = flags.DEFINE_integer("iters", 1, "Calls per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (the median is reported).")
_WARMUP = flags.DEFINE_integer(
    "warmup",
    3,
    "Untimed calls after compilation (with 1, JAX's times on this VM still fell "
    "over the first rounds).",
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")
_MODEL_KWARGS = flags.DEFINE_string(
    "model_kwargs",
    "{}",
    'Extra NFNet arguments as JSON, e.g. \'{"widths": [32, 64, 128, '
    '128], "depths": [1, 1, 1, 1], "group_width": 16}\'.',
)
_COMPARE = flags.DEFINE_enum("compare", None, ["timm"], "Also time timm's equivalent model.")
_TIMM_CHANNELS_LAST = flags.DEFINE_bool(
    "timm_channels_last", False, "Run timm in channels-last (NHWC) memory format."
)
_JSON = flags.DEFINE_string("json", None, "Also write the full result as JSON here.")


def _bool(text: str, flag: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise app.UsageError(f"--{flag} takes true/false values, got {text!r}.")
    return text.lower() in ("true", "1", "yes")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    json_dir = os.path.dirname(os.path.abspath(_JSON.value)) if _JSON.value else None
    if json_dir and not os.path.isdir(json_dir):  # Fail before a long run, not after it.
        raise app.UsageError(f"--json: directory {json_dir!r} does not exist.")
    res = _RESOLUTION.value
    configs = step.build_configs(
        group_convs=_GROUP_CONV.value,
        conv_grads=_CONV_GRAD.value,
        remats=[_bool(r, "remat") for r in _REMAT.value],
        donates=[_bool(d, "donate") for d in _DONATE.value],
        variant=_VARIANT.value,
        batch_size=_BATCH.value,
        inference_resolution=_INFER_RES.value or res or 192,
        train_resolution=_TRAIN_RES.value or res or 128,
        dtype=_DTYPE.value,
        modes=tuple(_MODES.value),
        iters=_ITERS.value,
        repeats=_REPEATS.value,
        warmup=_WARMUP.value,
        num_classes=_NUM_CLASSES.value,
        model_kwargs=json.loads(_MODEL_KWARGS.value),
    )
    result = step.run(
        configs, compare_timm=_COMPARE.value == "timm", timm_channels_last=_TIMM_CHANNELS_LAST.value
    )
    print(step_report.format_table(result))
    if _JSON.value:
        files.write_json(_JSON.value, result, indent=1)


if __name__ == "__main__":
    app.run(main)
