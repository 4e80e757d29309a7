"""Errors of the worker family; entry points print ``str(err)`` instead of a traceback."""

from __future__ import annotations

from schemas.errors import XcloudError


class WorkerError(XcloudError):
    """Root of the worker family: the agent cannot do what was asked."""


class IdentityError(WorkerError):
    """The worker has no usable identity (principal id + token) to join the grid with."""
