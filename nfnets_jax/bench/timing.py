"""What every benchmark shares: the round-robin timer, compilation with XLA's memory
estimate, memory readings, peak FLOP/s per device, the environment, and text tables.

Timing protocol (`round_robin`): every measurement is warmed up first, then the
measurements are timed in turn, one timed run of each per round, for `repeats` rounds; the
order rotates from round to round. Interleaving puts the measurements that are compared
under the same background load (these machines are shared); rotating keeps any one of them
from always following the same other (PyTorch's OpenMP threads spin for a while after a
call and slow whatever runs next). A timed run is `iters` back-to-back calls of
`carry = call(carry)` (the carry lets donated buffers flow from call to call), blocked on at
the end; its time per call is recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

# Dense peak FLOP/s per JAX device, matched by substring of `device.device_kind` (first
# match wins). float32 on A100/H100/H200 is the TF32 tensor-core peak, which XLA uses for
# float32 convolutions and matmuls at default precision; V100 has no bfloat16 units; TPU
# float32 has no published peak. A TPU v3 JAX device is one core (half a chip); v4 and v5e
# devices are whole chips. CPUs have no entry (no utilisation is reported).
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM; PCIe is ~25% lower.
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "V100": {"bfloat16": None, "float32": 15.7e12},
    "TPU v3": {"bfloat16": 61.5e12, "float32": None},
    "TPU v4": {"bfloat16": 275e12, "float32": None},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": None},
    "TPU v5e": {"bfloat16": 197e12, "float32": None},
}
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Timed:
    """One measurement to time: `carry = call(carry)`.

    Attributes:
      name: how the logs call it.
      call: one call; its output is fed back in as the next call's input.
      carry: the current input of `call`.
      times: seconds per call of each timed run, filled by `round_robin`.
    """

    name: str
    call: Callable[[Any], Any]
    carry: Any = None
    times: list[float] = dataclasses.field(default_factory=list)


def time_once(item: Timed, iters: int) -> float:
    """Seconds per call over `iters` back-to-back calls of `item` (blocked on at the end)."""
    start = time.perf_counter()
    carry = item.carry
    for _ in range(iters):
        carry = item.call(carry)
    item.carry = jax.block_until_ready(carry)
    return (time.perf_counter() - start) / iters


def round_robin(
    items: Sequence[Timed],
    repeats: int,
    warmup: int = 1,
    iters: int = 1,
    on_warm: Callable[[Timed], None] | None = None,
) -> None:
    """Warms up every item, then times them in rotating rounds (module docstring).

    Args:
      items: what to time; each item's `times` gets `repeats` entries.
      repeats: timed rounds.
      warmup: untimed calls per item first.
      iters: calls per timed run.
      on_warm: called with each item after its warm-up (e.g. to read memory).
    """
    if repeats < 1 or iters < 1:
        raise ValueError(f"repeats and iters must be >= 1, got {repeats} and {iters}.")
    for item in items:
        for _ in range(warmup):
            item.carry = jax.block_until_ready(item.call(item.carry))
        if on_warm is not None:
            on_warm(item)
    for round_index in range(repeats):
        shift = round_index % len(items)
        for item in list(items[shift:]) + list(items[:shift]):
            item.times.append(time_once(item, iters))
        _LOG.info(
            "round %d/%d: %s",
            round_index + 1,
            repeats,
            ", ".join(f"{item.name} {item.times[-1]:.3g}s" for item in items),
        )


def compile_with_memory(
    fn: Callable[..., Any], args: Sequence[Any], donate_argnums: tuple[int, ...] = ()
) -> tuple[Any, float, int | None]:
    """AOT-compiles `fn` (jitted unless it is a `jax.pmap` / `jax.jit` already).

    Returns:
      (executable, seconds, XLA's per-device memory estimate in bytes: arguments + outputs
      + temporaries - donated aliases, or None where the backend has no memory analysis).
    """
    start = time.perf_counter()
    staged = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    compiled = staged.lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        m = compiled.memory_analysis()
        xla_bytes = int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - not every backend implements it.
        xla_bytes = None
    return compiled, seconds, xla_bytes


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of kind `device_kind` in `dtype`, None if unknown."""
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def jax_peak_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """Peak memory in bytes and where it comes from.

    Device statistics where the backend keeps them (GPU/TPU, peak since process start),
    else the peak resident set size of this process (CPU; includes everything the process
    allocated, torch included, and never decreases).
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return process_peak_rss(), "process peak RSS"


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        return os.cpu_count() or 1


def environment() -> dict[str, Any]:
    """Versions and hardware, for the record (torch and timm when importable)."""
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax_devices": jax.device_count(),
        "cpu_cores": cpu_cores(),
    }
    try:
        import torch

        from nfnets_jax.checkpoints import timm_convert

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["timm"] = timm_convert.import_timm().__version__
    except Exception:  # noqa: BLE001 - torch/timm are optional.
        pass
    return env


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], sep: str = " | ") -> str:
    """Left-aligned columns under a header and a rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda row: sep.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    rule = sep.replace(" ", "-").replace("|", "+")
    return "\n".join([line(header), rule.join("-" * w for w in widths)] + [line(r) for r in rows])


def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    """A table cell: "-" for None, yes/no for bools, `digits` significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value / scale:.{digits}g}"
    return str(value)
