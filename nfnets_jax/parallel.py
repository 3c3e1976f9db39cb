"""All device plumbing: distributed start-up, device counts, replicate, shard, prefetch.

Data parallelism here is `jax.pmap` over the local devices of every process, with one named
axis, `AXIS_NAME`, spanning every device of every host: `lax.pmean` over it averages across the
whole pod, and `lax.axis_index` over it is the global device index (0 .. device_count - 1),
which also makes the per-device RNG streams independent of how devices are split into hosts.

Keeping every pmap-aware helper in this one module keeps a later move to `jit` + sharding local.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AXIS_NAME = "batch"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
    auto: bool = False,
) -> None:
    """Starts `jax.distributed` when this run spans several processes.

    Does nothing for a single-process run (no arguments, `auto` False, and not one of several
    TPU pod workers, tasks of a Slurm `srun` step or `mpirun` ranks). On TPU pod slices and
    Slurm / Open MPI clusters JAX discovers the coordinator and layout itself: pass
    `auto=True` (multi-task `srun` steps and `mpirun` jobs are detected without it; a plain
    `python` inside an `sbatch` script or `salloc` shell stays single-process whatever
    `SLURM_NTASKS` says). Elsewhere pass the coordinator and the process layout.

    Args:
      coordinator_address: `host:port` of process 0's coordinator service, or None.
      num_processes: total number of processes, or None to auto-detect.
      process_id: this process's index, or None to auto-detect.
      cpu_collectives: CPU collectives implementation for multi-process CPU runs ('gloo'); must
        be set before `jax.distributed.initialize`, so it is taken here.
      auto: call `jax.distributed.initialize()` with auto-detection (TPU pods).

    Raises:
      ValueError: if only some of the three layout arguments are given.
    """
    layout = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in layout) and any(v is None for v in layout):
        raise ValueError(
            "Distributed launch needs all of coordinator_address, num_processes and process_id "
            f"(got {layout}); pass none of them to auto-detect on TPU pods and clusters."
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif auto or _in_cluster_environment():
        jax.distributed.initialize()


def _env_count(name: str) -> int:
    """A process-count environment variable as an int; 1 if unset or not an integer."""
    value = os.environ.get(name, "1")
    try:
        return int(value)
    except ValueError:
        logging.warning("Ignoring %s=%r: not an integer.", name, value)
        return 1


def _in_cluster_environment() -> bool:
    """Whether this process is one of several that JAX can auto-detect.

    TPU pod slices list their workers; Open MPI's `mpirun` sets the world size. For Slurm,
    only `srun` starts the tasks of a job step (and sets `SLURM_STEP_NUM_TASKS` with the
    step variables JAX reads); a job's `SLURM_NTASKS` alone is also set in an `sbatch`
    script or `salloc` shell, where a plain `python ...` is a single process.
    """
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    if _env_count("SLURM_STEP_NUM_TASKS") > 1:
        return True
    return _env_count("OMPI_COMM_WORLD_SIZE") > 1


def per_device_batch_size(global_batch_size: int) -> int:
    """Splits a global batch over every device of every process.

    Args:
      global_batch_size: examples per training step, summed over the whole job.

    Returns:
      The number of examples each device processes per step.

    Raises:
      ValueError: if the global batch does not divide by the total device count.
    """
    devices = jax.device_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the total device count "
            f"{devices} ({jax.process_count()} process(es) x {jax.local_device_count()} local "
            "devices); choose a multiple of the device count."
        )
    return global_batch_size // devices


def pmap(
    fn: Callable[..., Any],
    donate_argnums: tuple[int, ...] = (),
    devices: Sequence[jax.Device] | None = None,
) -> Callable[..., Any]:
    """`jax.pmap` over the local devices (or `devices`) with the trainer's named axis."""
    return jax.pmap(fn, axis_name=AXIS_NAME, donate_argnums=donate_argnums, devices=devices)


def pmean(tree: Any) -> Any:
    """Averages a pytree over every device of every process (call inside `pmap`)."""
    return jax.lax.pmean(tree, axis_name=AXIS_NAME)


def psum(tree: Any) -> Any:
    """Sums a pytree over every device of every process (call inside `pmap`)."""
    return jax.lax.psum(tree, axis_name=AXIS_NAME)


def device_index() -> jax.Array:
    """The global index of the current device (call inside `pmap`)."""
    return jax.lax.axis_index(AXIS_NAME)


def local_sharding(devices: Sequence[jax.Device] | None = None) -> jax.sharding.NamedSharding:
    """Sharding of a [local_devices, ...] array: one leading slice per local device."""
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS_NAME,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Copies a host pytree onto every local device (or `devices`): a new leading axis."""
    sharding = local_sharding(devices)
    n = sharding.mesh.devices.size
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding),
        tree,
    )


def unreplicate(tree: Any) -> Any:
    """Fetches the first local replica of a replicated pytree to host numpy."""
    return jax.tree.map(
        lambda x: (
            np.asarray(x.addressable_shards[0].data)[0]
            if isinstance(x, jax.Array)
            else np.asarray(x)[0]
        ),
        tree,
    )


def shard(batch: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Puts a host batch shaped [local_devices, per_device, ...] onto the local devices."""
    sharding = local_sharding(devices)
    n = sharding.mesh.devices.size
    for leaf in jax.tree.leaves(batch):
        if np.shape(leaf)[0] != n:
            raise ValueError(f"Batch leading axis {np.shape(leaf)[0]} != local device count {n}.")
    return jax.device_put(batch, sharding)


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, devices: Sequence[jax.Device] | None = None
) -> Iterator[Any]:
    """Yields host batches already placed on the local devices, `size` steps ahead.

    Each numpy batch with leading axis = local devices is split along that axis and sent
    with `jax.device_put` (asynchronous), so the copy of step t+1 overlaps the compute of
    step t; the arrays can be passed straight to a `pmap`-ed step.

    Args:
      iterator: batches (pytrees) whose leaves have leading axis = number of `devices`.
      size: batches kept in flight (2 is enough to overlap copy and compute).
      devices: target devices (None: `jax.local_devices()`).

    Raises:
      ValueError: a leaf's leading axis is not the device count.
    """
    queue = collections.deque()
    for batch in iterator:
        queue.append(shard(batch, devices))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def per_device_value(value: int) -> np.ndarray:
    """A host int32 array giving every local device `value` (a pmap argument)."""
    return np.full((jax.local_device_count(),), value, np.int32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """Order-sensitive integer checksum of an array's bits (equal bits -> equal checksum)."""
    bits = x.reshape(-1)
    if bits.dtype == jnp.bool_:
        bits = bits.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[bits.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(bits, unsigned).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
    return jnp.stack([jnp.sum(words), jnp.sum(words * weights)])


def replicas_identical(tree: Any) -> bool:
    """Whether every replica of a replicated pytree, on every process, holds identical bits.

    Compares per-leaf checksums of the bits computed on each device, so only a few integers
    per leaf leave the devices; in multi-process runs the checksums of every process's first
    replica are gathered and compared too (all processes must call this together).
    """
    leaves = [x for x in jax.tree.leaves(tree) if np.size(x)]
    if not leaves:
        return True
    sums = jax.device_get(jax.pmap(lambda xs: [_fingerprint(x) for x in xs])(leaves))
    local = all(np.array_equal(s[0], s[i]) for s in sums for i in range(1, s.shape[0]))
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # Multi-process runs only.

    first = np.stack([s[0] for s in sums])
    everyone = np.asarray(multihost_utils.process_allgather(first))
    return local and all(np.array_equal(everyone[0], other) for other in everyone[1:])


def process_allgather_ints(values: Sequence[int]) -> np.ndarray:
    """Every process's `values` (int32), as an array [process_count, len(values)].

    All processes must call this together; one process: just its own values.
    """
    array = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils  # Multi-process runs only.

    gathered = multihost_utils.process_allgather(array[0])
    return np.asarray(gathered).reshape(jax.process_count(), -1)


def broadcast_ints(values: Sequence[int]) -> list[int]:
    """Process 0's `values` (int32) on every process (all processes call this together)."""
    return [int(v) for v in process_allgather_ints(values)[0]]
