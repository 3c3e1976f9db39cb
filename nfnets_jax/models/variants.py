"""The variant tables of both model families, as plain data (REFERENCE §1).

One row per variant: the architecture (blocks per stage, stage widths) and the recipe's
per-variant defaults (train and test resolution, RandAugment layers and magnitude, dropout).
`nfnet.NFNet` and `nfresnet.NFResNet` read their architecture here; the trainer, evaluation,
prediction and benchmarks read the defaults through `registry.variant`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model variant.

    Attributes:
      depths: residual blocks per stage.
      widths: output channels per stage (NF-ResNets: at the standard width multiplier 4).
      train_px: training resolution of the recipe.
      test_px: evaluation resolution of the recipe.
      randaug_layers: RandAugment layers of the recipe (0: off).
      randaug_magnitude: RandAugment magnitude of the recipe.
      drop_rate: dropout before the classifier.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    train_px: int
    test_px: int
    randaug_layers: int
    randaug_magnitude: int
    drop_rate: float


F_WIDTHS = (256, 512, 1536, 1536)
PLUS_WIDTHS = (384, 768, 2048, 2048)
RESNET_WIDTHS = (256, 512, 1024, 2048)

# fmt: off
_F_SERIES = {
    "F0": Variant(depths=(1, 2, 6, 3), widths=F_WIDTHS, train_px=192, test_px=256,
                  randaug_layers=4, randaug_magnitude=5, drop_rate=0.2),
    "F1": Variant(depths=(2, 4, 12, 6), widths=F_WIDTHS, train_px=224, test_px=320,
                  randaug_layers=4, randaug_magnitude=10, drop_rate=0.3),
    "F2": Variant(depths=(3, 6, 18, 9), widths=F_WIDTHS, train_px=256, test_px=352,
                  randaug_layers=4, randaug_magnitude=10, drop_rate=0.4),
    "F3": Variant(depths=(4, 8, 24, 12), widths=F_WIDTHS, train_px=320, test_px=416,
                  randaug_layers=4, randaug_magnitude=15, drop_rate=0.4),
    "F4": Variant(depths=(5, 10, 30, 15), widths=F_WIDTHS, train_px=384, test_px=512,
                  randaug_layers=4, randaug_magnitude=15, drop_rate=0.5),
    "F5": Variant(depths=(6, 12, 36, 18), widths=F_WIDTHS, train_px=416, test_px=544,
                  randaug_layers=4, randaug_magnitude=15, drop_rate=0.5),
    "F6": Variant(depths=(7, 14, 42, 21), widths=F_WIDTHS, train_px=448, test_px=576,
                  randaug_layers=4, randaug_magnitude=15, drop_rate=0.5),
    "F7": Variant(depths=(8, 16, 48, 24), widths=F_WIDTHS, train_px=480, test_px=608,
                  randaug_layers=4, randaug_magnitude=15, drop_rate=0.5),
}
# fmt: on
# The "+" variants (F0+ .. F7+) change only the widths; each follows its base variant.
NFNET: dict[str, Variant] = {
    key: value
    for name, base in _F_SERIES.items()
    for key, value in ((name, base), (f"{name}+", dataclasses.replace(base, widths=PLUS_WIDTHS)))
}

# NF-ResNets train and test at 224 px with crop + flip only (their paper), no dropout by
# default (configs/imagenet_nfresnet.py sets 0.25).
_RESNET = dict(
    widths=RESNET_WIDTHS,
    train_px=224,
    test_px=224,
    randaug_layers=0,
    randaug_magnitude=0,
    drop_rate=0.0,
)
NFRESNET: dict[str, Variant] = {
    "ResNet26": Variant(depths=(2, 2, 2, 2), **_RESNET),
    "ResNet50": Variant(depths=(3, 4, 6, 3), **_RESNET),
    "ResNet101": Variant(depths=(3, 4, 23, 3), **_RESNET),
    "ResNet152": Variant(depths=(3, 8, 36, 3), **_RESNET),
    "ResNet200": Variant(depths=(3, 24, 36, 3), **_RESNET),
    "ResNet288": Variant(depths=(24, 24, 24, 24), **_RESNET),
    "ResNet600": Variant(depths=(50, 50, 50, 50), **_RESNET),
}

TABLES: dict[str, dict[str, Variant]] = {"NFNet": NFNET, "NFResNet": NFRESNET}


def lookup(model_name: str, variant: str) -> Variant:
    """The row of `variant` in `model_name`'s table.

    Raises:
      ValueError: naming the valid model names, or the model's valid variants.
    """
    if model_name not in TABLES:
        raise ValueError(f"Unknown model_name {model_name!r}; valid: {', '.join(TABLES)}.")
    table = TABLES[model_name]
    if variant not in table:
        raise ValueError(
            f"Unknown {model_name} variant {variant!r}; valid variants: {', '.join(table)}."
        )
    return table[variant]
