"""The one exception type users see.

Every problem caused by input (a path, a file, a flag, a checkpoint that does not fit
its config) is raised as :class:`ClawError`.  The CLI prints it as one line and exits
with code 2; the Python API lets it propagate.  Anything else escaping is a bug.
"""
from __future__ import annotations


class ClawError(Exception):
    """A user-facing error: ``str(err)`` is one clear line; ``details`` are extra lines."""

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = list(details or [])


class VerificationFailed(ClawError):
    """Numerical verification ran and exceeded its tolerance (exit code 1)."""

    exit_code = 1
