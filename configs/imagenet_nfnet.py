"""NFNet-F0..F7 and F0+..F7+ on ImageNet with the paper's recipe (REFERENCE §4).

The config argument names the variant, optionally followed by overrides of the global batch
size and SAM (on by default only for F6, which the paper trained with SAM):

  python scripts/train.py --config=configs/imagenet_nfnet.py:F3 --workdir=/ckpt/f3 \
      --config.data_dir=/data/tensorflow_datasets
  python scripts/train.py --config=configs/imagenet_nfnet.py:variant=F1,batch_size=1024 ...

Everything else follows from the variant and the global batch in code
(`nfnets_jax.train.recipe.make_plan`): peak lr = 0.1 * batch / 256 (1.6 at 4096), 360
epochs of 1,281,167 images with 5 warmup epochs (112,602 and 1,563 steps at 4096), train /
test px, dropout and RandAugment magnitude from `nfnets_jax.models.variants`.
"""

import ml_collections

from nfnets_jax import configlib
from nfnets_jax.models import registry

SAM_VARIANTS = ("F6",)


def get_config(arg: str = "F0") -> ml_collections.ConfigDict:
    """Returns the ImageNet config of one NFNet variant."""
    args = configlib.parse_arg(
        arg, dict(variant="F0", batch_size=4096, sam=""), positional="variant"
    )
    registry.variant("NFNet", args["variant"])  # A clear error for an unknown variant.
    config = configlib.load_config_file(configlib.sibling(__file__, "default.py"))
    config.dataset = "imagenet2012"
    config.num_train_examples = 1_281_167
    config.model.variant = args["variant"]
    config.batch_size = args["batch_size"]
    config.sam.enabled = (
        args["variant"] in SAM_VARIANTS
        if args["sam"] == ""
        else configlib.parse_bool(args["sam"], "sam")
    )
    return config
