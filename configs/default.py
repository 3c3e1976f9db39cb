"""Default training config: NFNet-F0 on ImageNet with the paper's recipe (REFERENCE §4).

Declares every config field; the other configs in this directory start from it and change a
few. Values that follow from others (peak learning rate = base_learning_rate * batch / 256,
warmup and total steps from epochs, image sizes / dropout / RandAugment of the variant) are
computed in `nfnets_jax.train.recipe.make_plan`, not stored here. A field set to 0 / -1 /
None below means "derive it", as its comment says.

  python scripts/train.py --config=configs/default.py --workdir=/tmp/nfnet_f0 \
      --config.data_dir=/data/tensorflow_datasets
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the F0 ImageNet config with every field declared."""
    config = ml_collections.ConfigDict()

    # Data: 'digits' (built in), 'imagenet2012', 'tfds:<name>' or 'folder:<path>'.
    config.dataset = "imagenet2012"
    config.data_dir = ""  # '' = the dataset's default location.
    config.eval_split = ""  # '' = the dataset's evaluation split (ImageNet: validation).
    config.num_train_examples = 0  # 0 = from the dataset (ImageNet: 1,281,167).
    config.train_image_size = 0  # 0 = the variant's train px.
    config.eval_image_size = 0  # 0 = the variant's test px.
    config.augment = ml_collections.ConfigDict(
        dict(
            enabled=True,  # False: no augmentation at all (squash-resized training images).
            random_crop=True,  # Inception crop (area 0.08-1, aspect 3/4-4/3), else squash-resize.
            flip=True,  # Random horizontal flip.
            randaug_layers=-1,  # -1 = the variant's (4 for every F-variant); 0 disables.
            randaug_magnitude=-1,  # -1 = the variant's.
            mixup_alpha=0.2,  # MixUp on half of the doubled batch; 0 disables.
            cutmix=True,  # CutMix on the other half.
        )
    )

    # Model: NFNet or NFResNet; `model` holds its constructor arguments.
    config.model_name = "NFNet"
    config.model = ml_collections.ConfigDict(
        dict(
            variant="F0",  # F0-F7, F0+-F7+ (models/variants.py); checked at start-up.
            width=1.0,
            se_ratio=0.5,
            alpha=0.2,
            stochdepth_rate=0.25,
            drop_rate=config_dict.placeholder(float),  # None = the variant's.
            activation="gelu",
            numerics="reference",
            group_conv="auto",
            conv_grad="auto",  # Backward pass: "matmul" on CPU, "xla" elsewhere.
            final_conv_mult=2.0,
            use_two_convs=True,
            depths=config_dict.placeholder(tuple),  # None = the variant's; small models only.
            widths=config_dict.placeholder(tuple),  # None = the variant's; small models only.
            group_width=128,
        )
    )

    # Optimisation: AGC -> weight decay -> Nesterov SGD, warmup + cosine schedule.
    config.batch_size = 4096  # Global, over every device of every host.
    config.num_epochs = 360.0
    config.num_train_steps = 0  # > 0 overrides num_epochs.
    config.warmup_epochs = 5.0
    config.base_learning_rate = 0.1  # Per 256 examples: peak lr = 0.1 * batch_size / 256.
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 2e-5
    config.clipping = 0.01  # AGC lambda; 0 disables clipping.
    # AGC's norms: plain float32 sums (one pass, the release's arithmetic; a unit norm that
    # overflows, ~1.8e19, passes through and the non-finite stop ends the diverged run), or
    # True: overflow-safe (the library default; one more pass, 2.2x AGC's time on CPU).
    config.agc_overflow_safe = False
    config.label_smoothing = 0.1
    config.ema_decay = 0.99999  # EMA decay is min(ema_decay, (1 + t) / (10 + t)).
    config.sam = ml_collections.ConfigDict(dict(enabled=False, rho=0.05))
    config.dtype = "bfloat16"  # Compute dtype; master weights and optimizer stay float32.
    config.seed = 0

    # Evaluation.
    config.eval_batch_size = 1024  # Global; the last batch is padded and masked.
    config.eval_every_steps = 5000  # 0 = only at the end.
    config.eval_ema = True

    # Checkpoints and logging.
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.log_every_steps = 100

    # Fine-tuning: start from a released parameter file (the classifier is re-initialised
    # when the number of classes differs). Ignored when the workdir holds a checkpoint.
    config.init_checkpoint = ""
    return config
