r"""Writes the signal-propagation plot of a freshly initialised model as a PNG.

python scripts/plot_signal_propagation.py --variant=F0 --out=/tmp/spp_f0.png
python scripts/plot_signal_propagation.py --variant=ResNet50 --out=/tmp/spp_r50.png
"""

from absl import app, flags

from nfnets_jax.models import registry, signal_prop

_VARIANT = flags.DEFINE_string(
    "variant", "F0", "An NFNet (F0..F7, F0+..F7+) or NF-ResNet (ResNet26..ResNet600) variant."
)
_OUT = flags.DEFINE_string("out", "signal_propagation.png", "PNG file to write.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Input size in pixels.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch of N(0, 1) inputs.")
_ALPHA = flags.DEFINE_float("alpha", 0.2, "Residual branch scale.")


def main(argv):
    del argv
    variant, alpha = _VARIANT.value, _ALPHA.value
    model_name, spec = registry.find_variant(variant)
    model = registry.build_forward(model_name, variant=variant, alpha=alpha)
    stats = signal_prop.measure(model, spec.depths, alpha, _RESOLUTION.value, _BATCH.value)
    signal_prop.plot(
        stats,
        _OUT.value,
        title=f"{variant} at initialisation (skip gains = 1, "
        f"N(0,1) inputs at {_RESOLUTION.value} px)",
    )
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
