"""Errors of the coordinator; all derive from ``CoordinatorError`` so entry points can show them."""

from __future__ import annotations

from typing import Any

from schemas import transitions
from schemas.errors import XcloudError


class CoordinatorError(XcloudError):
    """Root of every error the coordinator raises on purpose.

    ``wire_message`` is what a requester is told; ``detail`` travels in the error reply.
    """

    detail: dict[str, Any] | None = None

    def wire_message(self) -> str:
        return str(self)[:4096]


class StoreError(CoordinatorError):
    """The database cannot be used: bad URL, unreachable server, unknown schema version, ...

    Messages name the URL with its password masked and say what to do, because they are
    shown to operators as they are. Requesters only learn that the database is down.
    """

    def wire_message(self) -> str:
        return "the coordinator cannot reach its database"


class InvalidTransition(CoordinatorError, transitions.InvalidTransition):
    """A state change that a coordinator machine's table does not allow."""

    code = "conflict"


class NotFound(CoordinatorError):
    """The named record (worker, principal, ...) does not exist."""

    code = "not_found"


class AlreadyExists(CoordinatorError):
    """A record with this id already exists (and is live)."""

    code = "conflict"


class InvalidArgument(CoordinatorError, ValueError):
    """A value the store cannot keep (too long, wrong type); nothing was changed."""

    code = "invalid"
