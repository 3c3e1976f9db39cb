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
