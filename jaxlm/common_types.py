"""Types shared by every layer of jaxlm.

This module imports nothing from JAX so that the host-side data layer can use it too.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix: a bad config value, missing data, a bad path or flag.

    The message is one line that names the field (or file, or flag) and says how to fix it.
    The CLI prints it as ``error: <message>`` and exits with status 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or inconsistent with another."""


class DataError(UserError):
    """Input data is missing, empty or malformed."""


class CheckpointError(UserError):
    """A workdir or checkpoint cannot be used with the given config."""
