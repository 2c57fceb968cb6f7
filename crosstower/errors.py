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


class TrainingError(CrosstowerError):
    """Training diverged (a non-finite loss): the settings, not the code, need changing."""


class CheckpointError(CrosstowerError):
    """A checkpoint file is missing, corrupt, or belongs to a different model."""


def first_error_line(error, root: str = "", skip: tuple[str, ...] = ()) -> str:
    """One problem of a pydantic ``ValidationError`` as one line: ``root.loc: message``.

    ``skip`` drops location parts such as the tag pydantic inserts for a tagged union. Of
    several problems the deepest is reported: for a value that fits no member of a plain union,
    pydantic reports one problem per member, and the member that got furthest (e.g. a mapping
    with one unknown key) says best what is wrong.
    """
    errors = error.errors()
    first = max(errors, key=lambda e: len(e["loc"]))  # max keeps the first of equally deep ones
    parts = ([root] if root else []) + [str(p) for p in first["loc"] if str(p) not in skip]
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return f"{'.'.join(parts)}: {message}" if parts else message
