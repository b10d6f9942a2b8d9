"""User-facing errors and exit codes.

Anything the user can fix (a wrong path, a file too short, a bad flag) is raised as
:class:`UserError`; the CLI prints its message as one line and exits with ``EXIT_USAGE``.
Anything else is a bug: the CLI prints one line saying so, with the path of the traceback it saved
(:func:`save_traceback`), exit code ``EXIT_BUG``.
"""

from __future__ import annotations

import os
import tempfile
import traceback

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: the message says what was wrong and what to do
EXIT_BUDGET_FAILED = 3  # audit ran, but no format meets the accuracy budget (for CI gates)
EXIT_BUG = 1  # an error quantaudit did not foresee: a bug, reported with a saved traceback


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def save_traceback(command: str) -> str:
    """Write the exception being handled, with its traceback, to a new file in the temp folder; return its path."""
    fd, path = tempfile.mkstemp(prefix=f"quantaudit-{command}-traceback-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(traceback.format_exc())
    return path
