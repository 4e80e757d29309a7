"""Errors of the coordinator; all derive from ``CoordinatorError`` so entry points can show them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.errors import XcloudError

if TYPE_CHECKING:
    from coordinator.worker_state import WorkerState


class CoordinatorError(XcloudError):
    """Root of every error the coordinator raises on purpose."""


class StoreError(CoordinatorError):
    """The database cannot be used: bad URL, unreachable server, unknown schema version, ...

    Messages name the URL with its password masked and say what to do, because they are
    shown to operators as they are.
    """


class InvalidTransition(CoordinatorError):
    """A worker state change that the state machine does not allow."""

    def __init__(self, worker_id: str, old: WorkerState, new: WorkerState) -> None:
        super().__init__(
            f"worker {worker_id!r}: transition {old.value} -> {new.value} is not allowed"
        )
        self.worker_id = worker_id
        self.old = old
        self.new = new


class NotFound(CoordinatorError):
    """The named record (worker, principal, ...) does not exist."""


class AlreadyExists(CoordinatorError):
    """A record with this id already exists (and is live)."""


class InvalidArgument(CoordinatorError, ValueError):
    """A value the store cannot keep (too long, wrong type); nothing was changed."""
