"""User-facing errors.

Anything a user can cause (bad path, bad flag, bad image, offline hub) raises
`VitloraError`; the CLI prints its message on one line and exits with code 2,
never a traceback.
"""

from __future__ import annotations


class VitloraError(Exception):
    """An error whose message is meant for the user, printed without a traceback."""

    exit_code: int = 2


class BadImageError(VitloraError):
    """An image file could not be decoded (unreadable, truncated, not an image, too large)."""
