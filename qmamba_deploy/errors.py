"""User-facing errors: one clear sentence naming the file, tensor or flag, and the fix.

The CLI prints ``str(error)`` without a traceback and exits with status 2.
"""


class QMambaError(Exception):
    """Base class of every error caused by user input (files, flags, tensors)."""


class CheckpointError(QMambaError, ValueError):
    """A checkpoint cannot be read or does not match the architecture."""


class ImageError(QMambaError, ValueError):
    """An image cannot be read, written or used by the model."""


class OptionError(QMambaError, ValueError):
    """A flag or argument value that cannot work (the message names the flag)."""


class EnvironmentMissing(QMambaError, RuntimeError):
    """A tool or library the command needs is not installed here (TensorRT, a GPU, nvcc)."""


class ModelError(QMambaError, RuntimeError):
    """An artifact that loads but does not work: its runtime fails on an input, or its output holds NaN."""
