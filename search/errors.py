"""One exception type for everything a user can fix.

The CLI turns a :class:`UserError` into one line on stderr and a non-zero exit, never a traceback,
so every check that guards user input raises this with the file/key at fault and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
