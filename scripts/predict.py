"""Classifies image files with an NFNet checkpoint: the top-5 ImageNet classes of each.

  python scripts/predict.py --checkpoint=F0 cat.jpg dog.png
  python scripts/predict.py --checkpoint=/tmp/F0.npz --resolution=320 --top_k=3 *.jpg
  python scripts/predict.py --checkpoint=/tmp/run --labels=classes.txt image.jpg

The checkpoint is anything `scripts/evaluate.py` accepts. Images get the evaluation
preprocessing (bicubic squash-resize to (S + 32)^2, centre crop S^2). A training workdir
predicts as its run evaluated (its model, eval resolution, resize margin and class names,
from its config.json; the output says so and warns where a flag overrides them). Models with
1000 classes print ImageNet class names; others use --labels (one name per line), a
workdir's recorded names, or print label indices. Files that cannot be read or decoded are
reported after the others' predictions, and the exit status is then 1.
"""

import sys

from absl import app, flags

from nfnets_jax import cli, predict
from nfnets_jax.checkpoints import loading, run_record
from nfnets_jax.models import registry

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint (zoo name, file, workdir).")
_VARIANT = flags.DEFINE_string("variant", None, "Expected variant (default: detected).")
_RESOLUTION = flags.DEFINE_integer(
    "resolution", None, "Test px (default: a workdir's eval px, else the variant's)."
)
_STEP = flags.DEFINE_integer("step", None, "Workdirs: the checkpoint step (default: newest).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
_LABELS = flags.DEFINE_string("labels", None, "Class names, one per line (non-ImageNet).")
_NUMERICS = flags.DEFINE_enum(
    "numerics",
    None,
    ["reference", "timm"],
    "Model numerics (default: timm for .pth files, else reference).",
)
flags.mark_flag_as_required("checkpoint")


def _load() -> tuple[object, str, dict, int, int, list[str] | None]:
    """(params, model name, model kwargs, resolution, margin, recorded class names)."""
    record = run_record.read(_CHECKPOINT.value)
    if record is None:
        if _STEP.value is not None:
            raise app.UsageError("--step applies to training workdirs only.")
        params, kwargs = loading.load(_CHECKPOINT.value, variant=_VARIANT.value)
        px = _RESOLUTION.value or registry.variant("NFNet", kwargs["variant"]).test_px
        return params, "NFNet", kwargs, px, 32, None
    print(f"workdir {_CHECKPOINT.value}: {record.describe()} (its {run_record.RECORD})")
    for line in run_record.overrides(record, resolution=_RESOLUTION.value):
        print(f"warning: {line}")
    margin = 32 if record.eval_margin is None else record.eval_margin
    names = record.class_names
    if names and _LABELS.value:
        print(f"warning: --labels={_LABELS.value} replaces the run's class names")
    run_record.check_variant(record, _VARIANT.value)
    params = run_record.load_params(record, _STEP.value)
    px = _RESOLUTION.value or record.eval_image_size
    return params, record.model_name, dict(record.model_kwargs), px, margin, names


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more image files to classify.")
    params, model_name, kwargs, resolution, margin, names = _load()
    if _NUMERICS.value:
        if model_name != "NFNet":
            raise app.UsageError(f"--numerics applies to NFNet models, not {model_name}.")
        kwargs["numerics"] = _NUMERICS.value
    failures = []
    predictions = predict.classify_files(
        registry.logits_fn(model_name, **kwargs),
        params,
        paths,
        predict.class_names(kwargs["num_classes"], _LABELS.value, names),
        resolution,
        top_k=_TOP_K.value,
        margin=margin,
        failures=failures,
    )
    for prediction in predictions:
        print(prediction.path)
        for rank, (index, name, prob) in enumerate(prediction.top, start=1):
            print(f"  {rank}. {100 * prob:6.2f}%  {name}  [{index}]")
    for _, reason in failures:
        print(f"error: {reason}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(paths)} files could not be classified.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
