"""Training checkpoints in the workdir with orbax: atomic, keep the last N, resume the newest.

A checkpoint holds the host (unreplicated) training state as a pytree of numpy arrays: step,
params, EMA params, optimizer state and the base RNG key. The data position is the step: the
input pipeline is deterministic given its seed and resumes at `start_step=step`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and the partial one is never restored.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores training states under `<workdir>/checkpoints/<step>`."""

    def __init__(self, workdir: str, keep: int = 3):
        """Creates (or reopens) the checkpoint directory of a workdir.

        Args:
          workdir: the run's working directory.
          keep: how many of the newest checkpoints to keep.
        """
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (a host pytree) as the checkpoint of `step`; blocks until committed."""
        state = jax.tree.map(np.asarray, state)
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Reads a checkpoint into the structure of `template`.

        Args:
          template: a host pytree with the structure, shapes and dtypes of the saved state.
          step: which checkpoint; the newest when None.

        Returns:
          The restored state, a pytree of numpy arrays shaped like `template`.

        Raises:
          FileNotFoundError: if there is no checkpoint to restore.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        template = jax.tree.map(np.asarray, template)
        return self._manager.restore(int(step), args=ocp.args.StandardRestore(template))

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
