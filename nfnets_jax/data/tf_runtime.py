"""Lazy, polite TensorFlow import for the input pipeline.

TensorFlow is only used on the host to read and augment data. `import_tf` hides every
accelerator from it (so it never grabs GPU memory that JAX needs) and caps its global
thread pools; each `tf.data` pipeline gets its own bounded private thread pool from
`dataset_options`. `stream_seed` is the stateless seed of one random stream of one host.
"""

import os
import types

_TF = None


def default_num_threads() -> int:
    """Threads for one tf.data pipeline: all cores but one (JAX needs a core to dispatch)."""
    return max(1, (os.cpu_count() or 1) - 1)


def import_tf() -> types.ModuleType:
    """Imports TensorFlow once, with GPUs/TPUs hidden and small global thread pools.

    Returns:
      The `tensorflow` module.
    """
    global _TF
    if _TF is not None:
        return _TF
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # The TF runtime was already initialised by the caller; keep their choice.
    try:
        # Ops outside tf.data (eager helpers) stay small; tf.data maps use the private pool.
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        pass
    _TF = tf
    return tf


def dataset_options(num_threads: int | None = None, deterministic: bool = True):
    """tf.data options: bounded private thread pool, deterministic element order.

    Args:
      num_threads: size of the pipeline's private thread pool (None: `default_num_threads()`).
      deterministic: keep element order fixed (needed for reproducible, resumable runs).

    Returns:
      A `tf.data.Options`.
    """
    tf = import_tf()
    options = tf.data.Options()
    options.threading.private_threadpool_size = num_threads or default_num_threads()
    options.threading.max_intra_op_parallelism = 1
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return options


def stream_seed(seed: int, process_index: int, stream: int):
    """Stateless [2] seed for one random stream (orders, crops, mixing...) of one host."""
    tf = import_tf()
    base = tf.constant([seed, process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, stream)
