"""User-facing errors: every error the suite raises about a user's input derives from ``UserError``, and
the CLI prints those (and missing files) as one line instead of a traceback. No imports: config.py and
the data layer use this without pulling in torch."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, run folder, data, checkpoint, weights file); the message
    names the culprit."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
