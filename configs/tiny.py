"""A tiny NFNet on 'digits' for smoke tests: four steps, seconds of compute on one CPU.

Exercises every part of the trainer (dropout and stochastic depth RNG, AGC, EMA, checkpoints
every 2 steps, evaluation of raw and EMA weights) at 32 px with a depth-1-per-stage model.
The test suite uses it; it is also a quick check that a new machine or install works:

  python scripts/train.py --config=configs/tiny.py --workdir=/tmp/nfnets_tiny
"""

import ml_collections

from nfnets_jax import configlib


def get_config() -> ml_collections.ConfigDict:
    """Returns the tiny smoke-test config."""
    config = configlib.load_config_file(configlib.sibling(__file__, "quickstart.py"))
    config.model.widths = (32, 32, 32, 32)
    config.model.group_width = 16  # One group per conv: grouped convs compile slowly on CPU.
    config.model.drop_rate = 0.2
    config.model.stochdepth_rate = 0.25
    config.batch_size = 16
    config.num_train_steps = 4
    config.warmup_epochs = 0.0
    config.eval_batch_size = 360
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    return config
