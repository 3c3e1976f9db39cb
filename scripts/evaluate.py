"""Evaluates NFNet checkpoints (top-1 / top-5) with the paper's protocol, beside the paper.

  python scripts/evaluate.py --checkpoint=F0 --data_dir=/data/tfds
  python scripts/evaluate.py --checkpoint=F0 --checkpoint=F1 --resolution=224
  python scripts/evaluate.py --checkpoint=/tmp/F0.npz --dataset=folder:/data/val_subset
  python scripts/evaluate.py --checkpoint=dm_nfnet_f0.pth       # timm weights, timm numerics
  python scripts/evaluate.py --checkpoint=/tmp/nfnets_tiny --dataset=digits --resolution=32

A checkpoint is a zoo name (F0..F6, downloaded and md5-checked into $NFNETS_JAX_CACHE), a
released pickle (loaded safely), a `.npz`, a timm `.pth`, or a training workdir (its newest
readable checkpoint or --step, EMA weights unless --noema). The variant is detected from the
parameters. Images are squash-resized (bicubic) to (S + 32)^2 and centre-cropped to S^2,
S = the variant's test resolution unless --resolution is given. A training workdir is
evaluated as its run evaluated: its model and options, eval resolution, resize margin,
dataset and split, from its config.json; the output says so, and warns where a flag
overrides them. Data parallel over all devices; every example of the split is counted
exactly once.
"""

from absl import app, flags

from nfnets_jax import cli, evaluation

_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", None, "Checkpoint(s) to evaluate.")
_VARIANT = flags.DEFINE_string("variant", None, "Expected variant (default: detected).")
_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "imagenet2012, digits, tfds:<name> or folder:<path> (default: a workdir's own dataset, "
    "else imagenet2012).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_SPLIT = flags.DEFINE_string("split", None, "Split (default: the dataset's evaluation split).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "imagenet2012 manual download directory.")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Test px (default: the variant's).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Global batch size (default: 16 per device)."
)
_NUMERICS = flags.DEFINE_enum(
    "numerics",
    None,
    ["reference", "timm"],
    "Model numerics (default: timm for .pth files, else reference).",
)
_EMA = flags.DEFINE_bool("ema", True, "Workdirs: evaluate the EMA parameters.")
_STEP = flags.DEFINE_integer("step", None, "Workdirs: the checkpoint step (default: newest).")
_GROUP_CONV = flags.DEFINE_string("group_conv", "auto", "Grouped-convolution strategy.")
flags.mark_flag_as_required("checkpoint")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    reports = []
    for checkpoint in _CHECKPOINTS.value:
        reports.append(
            evaluation.evaluate_checkpoint(
                checkpoint,
                _DATASET.value,
                variant=_VARIANT.value,
                resolution=_RESOLUTION.value,
                global_batch_size=_BATCH_SIZE.value,
                data_dir=_DATA_DIR.value,
                split=_SPLIT.value,
                manual_dir=_MANUAL_DIR.value,
                numerics=_NUMERICS.value,
                ema=_EMA.value,
                group_conv=_GROUP_CONV.value,
                step=_STEP.value,
            )
        )
        for note in reports[-1].notes:
            print(note)
        print(evaluation.format_table(reports[-1:]), flush=True)
    if len(reports) > 1:
        print("\n" + evaluation.format_table(reports))


if __name__ == "__main__":
    cli.run(main)
