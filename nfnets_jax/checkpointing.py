"""Training checkpoints in the workdir with orbax: atomic, keep the last N, resume the newest.

A checkpoint holds the host (unreplicated) training state as a pytree of numpy arrays: step,
params, EMA params, optimizer state and the base RNG key. The data position is the step: the
input pipeline is deterministic given its seed and resumes at `start_step=step`.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and the partial one is never restored.
A restore checks every array's shape against the template (orbax itself would return the
saved shapes). The run's config record (`config.json`) is written with `write_json_atomic`.
"""

from __future__ import annotations

import json
import os
import uuid
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


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` atomically: a temporary file, then `os.replace`.

    Readers see the old file or the complete new one, never a partial write; on any error
    the old file is left as it was.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Same directory (os.replace must not cross file systems); open() keeps the umask's mode.
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any | None:
    """The JSON object in `path`, or None if the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
