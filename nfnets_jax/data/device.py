"""Host-to-device prefetching for pmap-style data parallelism.

`prefetch_to_device` keeps `size` batches in flight on the local devices: each numpy batch
with leading axis = local devices is split along that axis and sent with `jax.device_put`
to a sharding over the local devices (asynchronous), so the copy of step t+1 overlaps the
compute of step t. The arrays it yields can be passed straight to a `jax.pmap`-ed step.
"""

import collections
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np


def local_sharding(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Sharding:
    """Sharding of a [local_devices, ...] array: one leading slice per local device."""
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))


def prefetch_to_device(
    iterator: Iterable[dict], size: int = 2, devices: Sequence[jax.Device] | None = None
) -> Iterator[dict]:
    """Yields batches already placed on the local devices, `size` steps ahead.

    Args:
      iterator: numpy batches whose leaves have leading axis = number of `devices`.
      size: batches kept in flight (2 is enough to overlap copy and compute).
      devices: target devices (None: `jax.local_devices()`).

    Returns:
      Iterator of the same dicts with `jax.Array` leaves sharded over the devices.
    """
    sharding = local_sharding(devices)
    num_devices = len(sharding.mesh.devices)
    queue = collections.deque()

    def put(batch):
        def put_leaf(x):
            if x.shape[:1] != (num_devices,):
                raise ValueError(
                    f"Batch leaf of shape {x.shape} must have leading axis = "
                    f"{num_devices} local devices."
                )
            return jax.device_put(x, sharding)

        return jax.tree.map(put_leaf, batch)

    iterator = iter(iterator)
    for batch in iterator:
        queue.append(put(batch))
        if len(queue) >= size:
            break
    while queue:
        yield queue.popleft()
        for batch in iterator:
            queue.append(put(batch))
            break
