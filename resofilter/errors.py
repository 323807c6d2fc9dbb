"""User-facing errors.

Every error a user can cause with bad input or configuration is a :class:`ResoFilterError`;
the CLI prints its message (which names the file and line, or the config key) and exits
with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ResoFilterError(Exception):
    """Bad input or configuration; the message says where and what."""


class DataError(ResoFilterError):
    """A data file is malformed: the message names the file and line."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class ConfigError(ResoFilterError):
    """A config value is invalid: the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key `{key}`: {message}")
        self.key = key
