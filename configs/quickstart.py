"""Quick start: a small NFNet on the built-in 'digits' dataset, on a laptop CPU in minutes.

The same trainer, recipe and code path as the ImageNet configs, scaled down: 32 px images of
scikit-learn's 8x8 handwritten digits (1,437 train / 360 test), an NFNet with the F0 block
pattern at depth 1 per stage and narrow widths, float32 (bfloat16 is slow on CPUs).

  python scripts/train.py --config=configs/quickstart.py --workdir=/tmp/nfnets_quickstart
"""

import ml_collections

from nfnets_jax import configlib


def get_config() -> ml_collections.ConfigDict:
    """Returns the digits quick-start config."""
    config = configlib.load_config_file(configlib.sibling(__file__, "default.py"))
    config.dataset = "digits"
    config.train_image_size = 32
    config.eval_image_size = 32
    # 8x8 digits fill the frame and are not mirror-symmetric: no crop, flip or mixing.
    config.augment.random_crop = False
    config.augment.flip = False
    config.augment.randaug_layers = 0
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix = False

    config.model.depths = (1, 1, 1, 1)
    config.model.widths = (32, 64, 128, 128)
    config.model.group_width = 16
    config.model.drop_rate = 0.1
    config.model.stochdepth_rate = 0.1

    config.batch_size = 64
    config.num_epochs = 15.0
    config.warmup_epochs = 1.0
    config.base_learning_rate = 0.4  # Peak lr 0.1 at batch 64.
    config.clipping = 0.04  # Small batches tolerate (and need) a looser AGC threshold.
    config.dtype = "float32"

    config.eval_batch_size = 360
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.log_every_steps = 50
    return config
