"""NF-ResNet-26..200 on ImageNet (Brock, De, Smith, ICLR 2021), with AGC.

Used in the NFNet paper's AGC-vs-batch-size experiment. The trainer, optimizer (AGC -> weight
decay -> Nesterov SGD), EMA, label smoothing and schedule are the NFNet recipe's; NF-ResNets
train and test at 224 px with inception crop + flip only (no RandAugment, no mixing). The
AGC threshold matters more here: the paper sweeps 0.01-0.16 and needs smaller values at
larger batches.

  python scripts/train.py --config=configs/imagenet_nfresnet.py:ResNet50 --workdir=/ckpt/r50
  python scripts/train.py \
      --config=configs/imagenet_nfresnet.py:variant=ResNet50,batch_size=1024,clipping=0.04 ...
"""

import ml_collections

from nfnets_jax import configlib
from nfnets_jax.models import registry


def get_config(arg: str = "ResNet50") -> ml_collections.ConfigDict:
    """Returns the ImageNet config of one NF-ResNet variant."""
    args = configlib.parse_arg(
        arg,
        dict(variant="ResNet50", batch_size=4096, clipping=0.01, epochs=360.0),
        positional="variant",
    )
    registry.variant("NFResNet", args["variant"])  # A clear error for an unknown variant.
    config = configlib.load_config_file(configlib.sibling(__file__, "default.py"))
    config.dataset = "imagenet2012"
    config.num_train_examples = 1_281_167
    config.model_name = "NFResNet"
    # NF-ResNet constructor arguments replace the NFNet ones declared in default.py.
    config.model = ml_collections.ConfigDict(
        dict(
            variant=args["variant"],
            width=4,
            alpha=0.2,
            stochdepth_rate=0.1,
            drop_rate=0.25,
            activation="relu",
            use_se=False,
            se_ratio=0.25,
            group_conv="auto",
            conv_grad="auto",  # Backward pass: "matmul" on CPU, "xla" elsewhere.
            depths=ml_collections.config_dict.placeholder(tuple),  # None = the variant's.
        )
    )
    config.augment.randaug_layers = 0
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix = False
    config.batch_size = args["batch_size"]
    config.clipping = args["clipping"]
    config.num_epochs = args["epochs"]
    return config
