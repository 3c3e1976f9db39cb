"""Test set-up: 8 fake CPU devices and a persistent compilation cache.

Both must be configured before jax is imported anywhere, so they live here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "NFNETS_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nfnets_jax_xla")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
