"""Exceptions that the CLI turns into one line on stderr and an exit status.

Stages raise :class:`DataError` for bad input data (exit 1) and :class:`UsageError`
for bad arguments (exit 2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VerseError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = 1

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DataError(VerseError):
    """The input data is missing, unreadable or inconsistent (exit status 1)."""

    exit_code = 1


class UsageError(VerseError):
    """The command line asks for something impossible (exit status 2)."""

    exit_code = 2


class NotImplementedYet(UsageError):
    """A subcommand whose issue has not landed yet (exit status 2)."""

    def __init__(self, command: str):
        super().__init__(f"'verse {command}' is not implemented yet")
