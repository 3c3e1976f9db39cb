"""Training-workdir checkpoints (orbax): atomic, keep the last N, resume the newest readable.

A checkpoint holds the host (unreplicated) training state as a pytree of numpy arrays: step,
params, EMA params, optimizer state and the base RNG key. The data position is the step: the
input pipeline is deterministic given its seed and resumes at `start_step=step`.

Orbax writes each checkpoint to `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
when complete, so a run killed mid-save leaves the previous checkpoints intact and the
partial one is never restored; opening a `Checkpointer` removes such leftovers.

Damage after the fact (a truncated data file, an emptied or deleted `_METADATA`) is told
apart from a config change: a step is read first without the template (its tree metadata,
then its arrays), and only a step that was read is compared with the template. When no step
is asked for, an unreadable step is skipped with a warning and the next older one is tried;
nothing is deleted. The first save after such a fallback moves the skipped steps to
`<step>.unreadable` (a name orbax ignores), so that orbax neither refuses to save their step
numbers again nor counts them among the kept checkpoints (and garbage-collects them).
`load_params` reads the parameters of a workdir for evaluation, with the same fallback.
Reads install (once) an unraisable-exception hook that drops only the "Event loop is closed"
callbacks a failed orbax read leaves behind.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from nfnets_jax import files
from nfnets_jax.checkpoints import errors

# What orbax appends to a step's directory name while writing it (orbax.checkpoint's
# atomicity TMP_DIR_SUFFIX; releases before 0.5 also appended "-<timestamp>").
TMP_DIR_MARKER = ".orbax-checkpoint-tmp"
# Where the first save after a fallback moves an unreadable step: `<step>.unreadable[.N]`.
UNREADABLE_SUFFIX = ".unreadable"
_MAX_REASON_CHARS = 400


class _Unreadable(Exception):
    """A step's files could not be read (internal; callers get CheckpointReadError)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _describe(error: BaseException) -> str:
    """`Type: first line of the message`, short enough for one log line."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(" .:")
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _drop_closed_loop_noise(unraisable: Any, previous: Callable[[Any], None]) -> None:
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        previous(unraisable)


def _quiet_failed_reads() -> None:
    """Drops the late 'Event loop is closed' callbacks of an orbax read that failed.

    When one array of a restore fails, orbax closes its event loop while tensorstore still
    completes the other reads; each completion then reports an unraisable RuntimeError
    (hundreds of tracebacks for a truncated file). Installed once; anything else passes on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_nfnets_quiet_failed_reads", False):
        return

    def hook(unraisable: Any) -> None:
        _drop_closed_loop_noise(unraisable, previous)

    hook._nfnets_quiet_failed_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _read(what: Callable[[], Any], doing: str) -> Any:
    """Runs an orbax read; any failure is damage of the step being read."""
    _quiet_failed_reads()
    try:
        return what()
    except MemoryError:  # Not damage: the host ran out of memory.
        raise
    except Exception as e:  # Orbax, tensorstore and json raise many types.
        raise _Unreadable(f"{doing} failed with {_describe(e)}") from e


def _read_step(directory: str, steps: list[int], step: int, read: Callable[[int], Any]) -> Any:
    """`read(step)` for an explicit step: no fallback, a CheckpointReadError if unreadable."""
    path = files.join(directory, str(step))
    if step not in steps:
        raise errors.CheckpointReadError(
            f"No checkpoint of step {step} in {directory}; available steps: {steps or 'none'}.",
            directory,
            {step: "no such step"},
        )
    try:
        return read(step)
    except _Unreadable as e:
        raise errors.CheckpointReadError(
            f"Checkpoint step {step} ({path}) cannot be read: {e.reason}. Its files are left "
            f"in place; the steps in {directory} are {steps}.",
            directory,
            {step: e.reason},
        ) from e


def _read_newest(
    directory: str, steps: list[int], read: Callable[[int], Any]
) -> tuple[int, Any, dict[int, str]]:
    """(step, read(step), skipped) for the newest step that can be read.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointReadError: no step can be read (listing each step and why).
    """
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}.")
    skipped: dict[int, str] = {}
    for step in sorted(steps, reverse=True):
        try:
            return step, read(step), skipped
        except _Unreadable as e:
            older = [s for s in steps if s < step]
            logging.warning(
                "Skipping unreadable checkpoint step %d (%s): %s; %s. Its files are left in "
                "place for inspection.",
                step,
                files.join(directory, str(step)),
                e.reason,
                f"trying step {max(older)}" if older else "no older step to try",
            )
            skipped[step] = e.reason
    lines = "".join(
        f"\n  step {s} ({files.join(directory, str(s))}): {r}" for s, r in skipped.items()
    )
    raise errors.CheckpointReadError(
        f"No readable checkpoint in {directory}; every step failed to read:{lines}\nThe files "
        "are left in place: restore them from a backup, or start a new run in a new workdir.",
        directory,
        skipped,
    )


def _path_key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)  # Arrays and orbax's ArrayMetadata.
    return tuple(np.shape(leaf) if shape is None else shape)


def _arrays(tree: Any) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """{normalised path: (printable path, shape)}; namedtuple fields and dict keys match."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        tuple(_path_key(k) for k in path): (jax.tree_util.keystr(path), _shape(leaf))
        for path, leaf in flat
    }


def _check_fits(template: Any, saved: Any, step: int, directory: str) -> None:
    """Raises the config-mismatch ValueError if `saved`'s arrays differ from `template`'s."""
    want, got = _arrays(template), _arrays(saved)
    shapes = [
        f"{name}: {got[key][1]} saved, {shape} expected"
        for key, (name, shape) in want.items()
        if key in got and got[key][1] != shape
    ]
    missing = [name for key, (name, _) in want.items() if key not in got]
    extra = [name for key, (name, _) in got.items() if key not in want]
    if not (shapes or missing or extra):
        return
    counts = [f"{len(shapes)} arrays differ in shape"] if shapes else []
    counts += [f"{len(missing)} model arrays are not in it"] if missing else []
    counts += [f"{len(extra)} saved arrays are not in the model"] if extra else []
    details = shapes[:5] + [f"{n}: not saved" for n in missing[:3]]
    details += [f"{n}: saved, not in the model" for n in extra[:3]]
    raise ValueError(
        f"Checkpoint {step} in {directory} does not fit the model being trained "
        f"({', '.join(counts)}): {'; '.join(details)}. It was written by a run with another "
        "model config; resume with that config or start a new run in a new workdir."
    )


def remove_stale_tmp_dirs(directory: str) -> list[str]:
    """Removes the `<step>.orbax-checkpoint-tmp` directories of saves that never finished.

    (Local workdirs. In cloud storage orbax writes a step in place and marks it complete with
    a `commit_success.txt` object; it lists only marked steps and rewrites an unmarked one.)

    Returns:
      The names removed (each logged with a warning).
    """
    if not files.isdir(directory):  # A bucket prefix exists only once an object is under it.
        return []
    names = [n for n in files.listdir(directory) if TMP_DIR_MARKER in n]
    for name in names:
        logging.warning(
            "Removing %s: a partial checkpoint left by a run that stopped while saving it "
            "(orbax never restores it).",
            files.join(directory, name),
        )
        files.rmtree(files.join(directory, name))
    return names


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`... whichever does not exist yet."""
    candidate, n = path, 0
    while files.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    # One StandardCheckpointHandler item ("default"): what `save` writes; reads its metadata.
    return ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def _read_tree(manager: ocp.CheckpointManager, step: int, template: Any = None) -> Any:
    """A step's tree (numpy arrays), into `template`'s structure when given; damage raises
    `_Unreadable`. The metadata is read (and, with a template, compared) first."""
    metadata = _read(lambda: manager.item_metadata(step), "reading its metadata")
    if metadata is None:  # Orbax finds no tree metadata: a plain read decides.
        args = ocp.args.StandardRestore(template) if template is not None else None
        return _read(
            lambda: manager.restore(step, args=args or ocp.args.StandardRestore()),
            "reading it without tree metadata",
        )
    if template is not None:
        _check_fits(template, metadata, step, str(manager.directory))
    args = ocp.args.StandardRestore(template)
    return _read(lambda: manager.restore(step, args=args), "reading its arrays")


class Checkpointer:
    """Saves and restores training states under `<workdir>/checkpoints/<step>`."""

    def __init__(self, workdir: str, keep: int = 3):
        """Creates (or reopens) the checkpoint directory of a workdir.

        Removes (process 0, with a warning) the temporary directories of saves that never
        finished.

        Args:
          workdir: the run's working directory (a local path or a gs:// URL).
          keep: how many of the newest checkpoints to keep.
        """
        self.directory = files.absolute(files.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = _manager(self.directory, options)
        if jax.process_index() == 0:
            remove_stale_tmp_dirs(self.directory)
        # {step: reason} of the unreadable steps the last fallback `restore` skipped.
        self.unreadable: dict[int, str] = {}

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (readable or not), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (a host pytree) as the checkpoint of `step`; blocks until committed.

        The first save after a `restore` that skipped unreadable steps moves them aside first
        (see `set_aside_unreadable`).
        """
        state = jax.tree.map(np.asarray, state)
        if self.unreadable:
            self.set_aside_unreadable(int(step))
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def set_aside_unreadable(self, saving: int) -> None:
        """Renames the steps the last restore skipped to `<step>.unreadable` (kept, never
        deleted): they are newer than the state this run continues from, and orbax would
        otherwise refuse to save their step numbers and count them among the kept ones."""
        if jax.process_index() == 0:
            for step in sorted(self.unreadable):
                source = files.join(self.directory, str(step))
                if not files.isdir(source):
                    continue
                target = _free_name(source + UNREADABLE_SUFFIX)
                files.rename(source, target)
                logging.warning(
                    "Moved unreadable checkpoint step %d to %s before saving step %d (this run "
                    "continues from an older step); its files are kept for inspection.",
                    step,
                    target,
                    saving,
                )
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("nfnets_set_aside_unreadable")
        self.unreadable = {}
        self._manager.reload()

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Reads a checkpoint into the structure of `template`.

        Args:
          template: a host pytree with the structure, shapes and dtypes of the saved state.
          step: which checkpoint; None: the newest that can be read (unreadable newer ones
            are skipped with a warning and listed in `self.unreadable`).

        Returns:
          The restored state, a pytree of numpy arrays shaped like `template`.

        Raises:
          FileNotFoundError: if there is no checkpoint to restore.
          CheckpointReadError: `step` (or, when None, every step) cannot be read, or `step`
            does not exist.
          ValueError: if the checkpoint's structure or array shapes differ from `template`'s.
        """
        template = jax.tree.map(np.asarray, template)
        read = lambda s: _read_tree(self._manager, s, template)
        if step is not None:
            restored = _read_step(self.directory, self.all_steps(), int(step), read)
        else:
            step, restored, self.unreadable = _read_newest(self.directory, self.all_steps(), read)
        _check_fits(template, restored, step, self.directory)
        return restored

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(workdir: str, step: int | None = None, ema: bool = True) -> dict[str, Any]:
    """Parameters from a training workdir's newest readable (or `step`) checkpoint.

    Reads only; an unreadable newer step is skipped with a warning when `step` is None.

    Args:
      workdir: the trainer's workdir (checkpoints under `<workdir>/checkpoints/<step>`).
      step: which checkpoint; the newest readable one when None.
      ema: take the EMA parameters when the checkpoint has them (the reference evaluates
        both; EMA is usually better).

    Returns:
      The parameter tree, host numpy.

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
      CheckpointReadError: `step` (or, when None, every step) cannot be read, or `step`
        does not exist.
      KeyError: the checkpoint holds no parameters.
    """
    directory = files.absolute(files.join(workdir, "checkpoints"))
    if not files.isdir(directory):
        raise FileNotFoundError(f"No checkpoints directory in workdir {workdir}.")
    manager = _manager(directory, ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(manager.all_steps())
        read = lambda s: _read_tree(manager, s)
        if step is None:
            step, state, _ = _read_newest(directory, steps, read)
        else:
            state = _read_step(directory, steps, int(step), read)
    finally:
        manager.close()
    state = state if isinstance(state, Mapping) else dataclasses.asdict(state)
    for key in ("ema_params", "params") if ema else ("params",):
        if key in state and state[key] is not None:
            return jax.tree.map(np.asarray, state[key])
    raise KeyError(f"Checkpoint {step} in {directory} has no 'params' (keys: {sorted(state)}).")
