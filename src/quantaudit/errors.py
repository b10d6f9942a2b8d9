"""User-facing errors and exit codes.

Anything the user can fix (a wrong path, a file too short, a bad flag) is raised as
:class:`UserError`; the CLI prints its message as one line and exits with ``EXIT_USAGE``.
Anything else is a bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: the message says what was wrong and what to do
EXIT_BUDGET_FAILED = 3  # audit ran, but no format meets the accuracy budget (for CI gates)


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
