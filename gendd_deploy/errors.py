"""Errors the library raises; only the CLI turns them into messages and exit codes."""


class GenddError(Exception):
    """Base class. `exit_code` is what the CLI exits with; the message is shown as one line."""

    exit_code = 1


class UsageError(GenddError):
    """Bad input from the user: a malformed recipe, a missing file or folder, a bad flag value."""

    exit_code = 2


class DataNotFound(UsageError):
    """A recipe's data set is not on this machine (the message says how to get it)."""


class ArtifactError(GenddError):
    """A stored artifact is missing, corrupt, or does not fit the stage that reads it."""

    exit_code = 3


class GateError(GenddError):
    """A quality gate (parity, accuracy) failed; the message carries the measured numbers."""

    exit_code = 4


class MissingDependency(GenddError):
    """An optional dependency or a device (TensorRT, a GPU) is not available here."""

    exit_code = 5

