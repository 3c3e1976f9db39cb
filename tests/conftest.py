"""Test set-up: 8 fake CPU devices, a fast XLA backend and a persistent compilation cache.

All must be configured before jax is imported anywhere, so they live here. The suite's time
is mostly XLA:CPU compilation of many small programs that run once; the backend's
optimisation level 0 (LLVM passes) halves it. It changes how the same HLO is lowered to
machine code, not what it computes: every numerical check holds at either level (run with
`NFNETS_TEST_XLA_OPT=2` for the default level). Subprocesses inherit the flags.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level="
    + os.environ.get("NFNETS_TEST_XLA_OPT", "0"),
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "NFNETS_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nfnets_jax_xla")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
