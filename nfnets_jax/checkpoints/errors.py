"""Errors raised when a checkpoint cannot be used; tests and callers match on these."""

import pickle


class CheckpointError(ValueError):
    """A checkpoint cannot be used: base class of the errors below."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names was run."""


class CheckpointFormatError(CheckpointError):
    """The file is not a readable checkpoint (truncated, not a pickle, wrong structure)."""


class CheckpointMismatchError(CheckpointError):
    """The parameter tree does not match the requested model."""


class CheckpointReadError(CheckpointError, OSError):
    """A training checkpoint's files cannot be read: damage (truncated, emptied or missing
    files), never a config problem. The message lists each step tried and why it failed.

    Attributes:
      directory: the checkpoints directory (`<workdir>/checkpoints`).
      failures: `{step: reason}` of the steps that could not be read, newest first.
    """

    def __init__(self, message: str, directory: str = "", failures: dict | None = None):
        super().__init__(message)
        self.directory = directory
        self.failures = dict(failures or {})
