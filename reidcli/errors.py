"""One exception hierarchy, caught once at the CLI edge (``Error: …``, exit 1)."""

__all__ = ["ReidError", "DataError", "FormatError", "ConfigError", "TrainingError"]


class ReidError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class DataError(ReidError):
    """A dataset folder, archive or image is missing, malformed or unreadable."""


class FormatError(ReidError):
    """An HDF5, index or checkpoint file is not what the reader expects."""


class ConfigError(ReidError):
    """Option values that cannot work together."""


class TrainingError(ReidError):
    """Training stopped (non-finite loss, exploding gradients)."""
