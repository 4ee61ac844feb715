"""User-facing error types: the CLI prints these as one line instead of a traceback."""

from __future__ import annotations


def USER_ERRORS() -> tuple[type, ...]:  # noqa: N802 - reads like a constant at the call site
    from evotok.config import ConfigError
    from evotok.runs import RunError

    errors: list[type] = [ConfigError, RunError, FileNotFoundError]
    try:
        from evotok.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)
