"""Pure index arithmetic: which examples each host reads, and where a resumed run starts.

Everything here is plain numpy/Python so the multi-host guarantees (disjoint shards whose
union is the split, every evaluation example exactly once) can be tested without
TensorFlow or several machines.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits over processes and their local devices."""

    global_batch_size: int
    process_count: int
    local_device_count: int

    @property
    def per_device_batch(self) -> int:
        return self.global_batch_size // (self.process_count * self.local_device_count)

    @property
    def per_host_batch(self) -> int:
        return self.per_device_batch * self.local_device_count


def batch_layout(
    global_batch_size: int, process_count: int, local_device_count: int
) -> BatchLayout:
    """Validates and returns the batch layout.

    Args:
      global_batch_size: examples per step over all hosts and devices.
      process_count: number of hosts (JAX processes).
      local_device_count: devices attached to this host.

    Returns:
      The `BatchLayout`.

    Raises:
      ValueError: if the batch does not divide evenly over all devices.
    """
    if process_count < 1 or local_device_count < 1:
        raise ValueError(
            f"process_count ({process_count}) and local_device_count "
            f"({local_device_count}) must be >= 1."
        )
    devices = process_count * local_device_count
    if global_batch_size < 1 or global_batch_size % devices:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count * local_device_count = {process_count} * {local_device_count} = "
            f"{devices}."
        )
    return BatchLayout(global_batch_size, process_count, local_device_count)


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of a split read by one host (sizes differ by <= 1).

    Args:
      num_examples: size of the split.
      process_index: this host.
      process_count: number of hosts.

    Returns:
      (start, end) example indices.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    start = num_examples * process_index // process_count
    end = num_examples * (process_index + 1) // process_count
    return start, end


def host_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
    """Example indices one host reads: a contiguous slice, disjoint across hosts."""
    start, end = host_range(num_examples, process_index, process_count)
    return np.arange(start, end, dtype=np.int64)


def eval_num_batches(num_examples: int, process_count: int, per_host_batch: int) -> int:
    """Batches every host yields in one evaluation pass (all hosts yield the same number).

    The largest host shard decides; smaller shards are padded with masked examples, so
    collectives in the evaluation step stay in lock-step across hosts.
    """
    largest = max(
        end - start
        for start, end in (host_range(num_examples, p, process_count) for p in range(process_count))
    )
    return math.ceil(largest / per_host_batch)


def resume_position(
    start_step: int, examples_per_step: int, examples_per_epoch: int
) -> tuple[int, int]:
    """Where a train stream starting at `start_step` begins.

    The train stream of a host is the concatenation of its seeded per-epoch orders; step `s`
    consumes stream positions [s * examples_per_step, (s + 1) * examples_per_step).

    Args:
      start_step: first step to produce.
      examples_per_step: examples one host consumes per step.
      examples_per_epoch: examples in this host's shard.

    Returns:
      (epoch, offset): the epoch containing the first example and its offset in that epoch.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if examples_per_epoch < 1:
        raise ValueError(
            "This host's shard of the training split is empty; use fewer "
            "processes or a larger dataset."
        )
    return divmod(start_step * examples_per_step, examples_per_epoch)
