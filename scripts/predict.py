"""Classifies image files with an NFNet checkpoint: the top-5 ImageNet classes of each.

  python scripts/predict.py --checkpoint=F0 cat.jpg dog.png
  python scripts/predict.py --checkpoint=/tmp/F0.npz --resolution=320 --top_k=3 *.jpg
  python scripts/predict.py --checkpoint=/tmp/run --labels=classes.txt image.jpg

The checkpoint is anything `scripts/evaluate.py` accepts. Images get the evaluation
preprocessing (bicubic squash-resize to (S + 32)^2, centre crop S^2). Models with 1000
classes print ImageNet class names; others need --labels (one name per line) or print
label indices.
"""

from absl import app, flags

from nfnets_jax import predict
from nfnets_jax.checkpoints import loading
from nfnets_jax.models import registry

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint (zoo name, file, workdir).")
_VARIANT = flags.DEFINE_string("variant", None, "Expected variant (default: detected).")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Test px (default: the variant's).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
_LABELS = flags.DEFINE_string("labels", None, "Class names, one per line (non-ImageNet).")
_NUMERICS = flags.DEFINE_enum(
    "numerics",
    None,
    ["reference", "timm"],
    "Model numerics (default: timm for .pth files, else reference).",
)
flags.mark_flag_as_required("checkpoint")


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more image files to classify.")
    params, kwargs = loading.load(_CHECKPOINT.value, variant=_VARIANT.value)
    if _NUMERICS.value:
        kwargs["numerics"] = _NUMERICS.value
    resolution = _RESOLUTION.value or registry.variant("NFNet", kwargs["variant"]).test_px
    predictions = predict.classify_files(
        registry.logits_fn("NFNet", **kwargs),
        params,
        paths,
        predict.class_names(kwargs["num_classes"], _LABELS.value),
        resolution,
        top_k=_TOP_K.value,
    )
    for prediction in predictions:
        print(prediction.path)
        for rank, (index, name, prob) in enumerate(prediction.top, start=1):
            print(f"  {rank}. {100 * prob:6.2f}%  {name}  [{index}]")


if __name__ == "__main__":
    app.run(main)
