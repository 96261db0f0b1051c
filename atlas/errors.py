"""Errors a user can act on. Each carries a hint and an exit code by class of error."""

from __future__ import annotations


class AtlasError(Exception):
    """An error with a message that says what was wrong and what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class BadInput(AtlasError):
    """The user's arguments or files are wrong."""

    exit_code = 2


class NotFound(AtlasError):
    """A model, alias, head or file that does not exist."""

    exit_code = 3


class Busy(AtlasError):
    """The atlas file is held by another process (a build, an ingest)."""

    exit_code = 4


class SchemaMismatch(AtlasError):
    """The atlas file was written by another schema version."""

    exit_code = 5


class TimedOut(BadInput):
    """A query that ran past the server's time limit (it was interrupted)."""


class TooMany(Busy):
    """The server is at its limit of concurrent SQL queries or build checks (429)."""


class Unauthorized(AtlasError):
    """No or a wrong bearer token (401); the right token for reads but not for builds (403)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 401) -> None:
        super().__init__(message, hint)
        self.status = status
