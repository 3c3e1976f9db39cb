"""Fine-tuning a released NFNet on a folder or TFDS dataset.

Starts from any checkpoint (a zoo name "F0".."F6", a released pickle, an `.npz`, a timm
`.pth` or a training workdir, loaded by `nfnets_jax.checkpoints.loading.load_params`); the
classifier is re-initialised for the new label set. A short schedule with a small learning
rate, crop + flip augmentation and the variant's train / test px (override with
image_size=...).

  python scripts/train.py \
      --config=configs/finetune.py:dataset=folder:/data/flowers,variant=F0,checkpoint=F0 \
      --workdir=/tmp/finetune_flowers
  python scripts/train.py \
      --config=configs/finetune.py:dataset=tfds:oxford_flowers102,variant=F1,checkpoint=/w/F1.npz \
      --workdir=/tmp/finetune_tfds --config.num_epochs=20

A folder dataset has one sub-directory per class (see docs/data.md).
"""

import ml_collections

from nfnets_jax import configlib
from nfnets_jax.models import registry


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Returns a fine-tuning config."""
    args = configlib.parse_arg(
        arg,
        dict(
            dataset="",
            variant="F0",
            checkpoint="",
            batch_size=256,
            epochs=10.0,
            lr=0.01,
            image_size=0,
        ),
    )
    registry.variant("NFNet", args["variant"])  # A clear error for an unknown variant.
    config = configlib.load_config_file(configlib.sibling(__file__, "default.py"))
    config.dataset = args["dataset"] or "folder:/path/to/dataset"
    config.init_checkpoint = args["checkpoint"] or args["variant"]
    config.model.variant = args["variant"]
    config.model.stochdepth_rate = 0.1
    config.train_image_size = args["image_size"]
    config.eval_image_size = args["image_size"]
    config.augment.randaug_layers = 0
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix = False
    config.batch_size = args["batch_size"]
    config.num_epochs = args["epochs"]
    config.warmup_epochs = 1.0
    config.base_learning_rate = args["lr"]  # Per 256 examples.
    config.weight_decay = 1e-5
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    return config
