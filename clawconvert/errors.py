"""The one exception type users see.

Every problem caused by input (a path, a file, a flag, a checkpoint that does not fit
its config) is raised as :class:`ClawError`.  The CLI prints it as one line and exits
with code 2; the Python API lets it propagate.  Anything else escaping is a bug.
"""
from __future__ import annotations

import re

# names inside messages come from files (tensor names, zip members, index entries): a newline,
# a carriage return or a terminal escape in one must not break the one-line promise
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_LINE = 2000


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b`` ...) and cut to a sane length."""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + "..."


class ClawError(Exception):
    """A user-facing error: ``str(err)`` is one clear line; ``details`` are a few extra lines,
    ``debug_details`` the complete list the CLI prints instead under ``--debug``."""

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None, debug_details: list[str] | None = None):
        super().__init__(one_line(message))
        self.details = [one_line(d) for d in (details or [])]
        self.debug_details = [one_line(d) for d in (debug_details or [])]


class VerificationFailed(ClawError):
    """Numerical verification ran and exceeded its tolerance (exit code 1)."""

    exit_code = 1
