r"""Prints parameter, module and MAC counts of NFNet / NF-ResNet variants (no compute).

python scripts/model_info.py                       # all NFNet variants at test size
python scripts/model_info.py --variants=F0,F1 --resolution=224
"""

from absl import app, flags

from nfnets_jax.models import counting, registry, variants

_VARIANTS = flags.DEFINE_list("variants", list(variants.NFNET), "Variants to count.")
_RESOLUTION = flags.DEFINE_integer(
    "resolution", 0, "Input size; 0 = each variant's test size (224 for NF-ResNets)."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")


def main(argv):
    del argv
    print(f"{'variant':<10} {'px':>4} {'params':>13} {'modules':>8} {'GMACs':>9}")
    for variant in _VARIANTS.value:
        model_name, spec = registry.find_variant(variant)
        px = _RESOLUTION.value or spec.test_px
        model = registry.build_forward(model_name, num_classes=_NUM_CLASSES.value, variant=variant)
        counts = counting.model_counts(model, px)
        print(
            f"{variant:<10} {px:>4} {counts['params']:>13,} {counts['modules']:>8} "
            f"{counts['macs'] / 1e9:>9.2f}"
        )


if __name__ == "__main__":
    app.run(main)
