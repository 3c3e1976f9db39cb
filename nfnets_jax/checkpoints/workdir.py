"""Training-workdir checkpoints (orbax): atomic, keep the last N, resume the newest.

A checkpoint holds the host (unreplicated) training state as a pytree of numpy arrays: step,
params, EMA params, optimizer state and the base RNG key. The data position is the step: the
input pipeline is deterministic given its seed and resumes at `start_step=step`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and the partial one is never restored.
A restore checks every array's shape against the template (orbax itself would return the
saved shapes). `load_params` reads the parameters of a workdir for evaluation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
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
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
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
          ValueError: if the checkpoint's structure or array shapes differ from `template`'s.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        template = jax.tree.map(np.asarray, template)
        restored = self._manager.restore(int(step), args=ocp.args.StandardRestore(template))
        expected = jax.tree_util.tree_flatten_with_path(template)[0]
        mismatched = [
            f"{jax.tree_util.keystr(path)}: {np.shape(got)} saved, {want.shape} expected"
            for (path, want), got in zip(expected, jax.tree.leaves(restored), strict=True)
            if np.shape(got) != want.shape
        ]
        if mismatched:
            raise ValueError(
                f"Checkpoint {step} in {self.directory} does not fit the model being trained "
                f"({len(mismatched)} arrays differ in shape): {'; '.join(mismatched[:5])}. "
                "It was written by a run with another model config; resume with that config "
                "or start a new run in a new workdir."
            )
        return restored

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(workdir: str, step: int | None = None, ema: bool = True) -> dict[str, Any]:
    """Parameters from a training workdir's newest (or `step`) checkpoint, for evaluation.

    Args:
      workdir: the trainer's workdir (checkpoints under `<workdir>/checkpoints/<step>`).
      step: which checkpoint; the newest when None.
      ema: take the EMA parameters when the checkpoint has them (the reference evaluates
        both; EMA is usually better).

    Returns:
      The parameter tree, host numpy.

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
      KeyError: the checkpoint holds no parameters.
    """
    directory = os.path.abspath(os.path.join(os.path.expanduser(workdir), "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoints directory in workdir {workdir}.")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {directory}.")
        state = manager.restore(int(step), args=ocp.args.StandardRestore())
    finally:
        manager.close()
    state = state if isinstance(state, Mapping) else dataclasses.asdict(state)
    for key in ("ema_params", "params") if ema else ("params",):
        if key in state and state[key] is not None:
            return jax.tree.map(np.asarray, state[key])
    raise KeyError(f"Checkpoint {step} in {directory} has no 'params' (keys: {sorted(state)}).")
