"""User-facing errors.

Every problem caused by the user's input (a missing file, a wrong column, an unknown config key,
an empty split) is raised as a :class:`CrosstowerError`. The CLI prints its message as one line
and exits with status 2; anything else is a bug and keeps its traceback.
"""


class CrosstowerError(Exception):
    """An error in the user's input: the message names the file or field and what was expected."""


class DataError(CrosstowerError):
    """A data file is missing, unreadable, or lacks an expected column or value."""


class ConfigError(CrosstowerError):
    """A configuration key is unknown, missing or has the wrong type."""


class CheckpointError(CrosstowerError):
    """A checkpoint file is missing, corrupt, or belongs to a different model."""
