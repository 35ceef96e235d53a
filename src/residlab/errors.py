"""The project's error types.

A :class:`UsageError` is a problem with what the user asked for or gave us (a config key, a
flag, a file, a folder): its message says what is wrong and how to fix it, and the command
line prints it as one line with exit status 2. Anything else that escapes a command is a bug
and is shown with its traceback (exit status 1).

``UsageError`` subclasses ``ValueError`` and :class:`NotFound` subclasses ``LookupError`` as
well, so library callers that catch the built-in types keep working.
"""

from __future__ import annotations

__all__ = ["NotFound", "UsageError"]


class UsageError(ValueError):
    """Bad input or environment, explained in one line that says how to fix it."""


class NotFound(UsageError, LookupError):
    """Something the user named (an experiment, a variant, a trait, a file) does not exist."""
