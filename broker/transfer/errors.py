"""Errors of the transfer engine; ``TransferError`` is the root of the family.

``code`` is the wire error code a handler answers with (docs/transfer.md lists them), so
a refusal raised deep in a storage plug-in reaches the peer as it was meant.
"""

from __future__ import annotations

import functools

from schemas.errors import XcloudError


class TransferError(XcloudError):
    """A transfer could not be done; the message says why in the user's words.

    Most are resumable: running the same transfer again (same tid) continues from what
    the receiver holds.
    """

    code = "transfer_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class TransferRefused(TransferError):
    """The other side (or our own storage) refused the transfer: ``forbidden``,
    ``quota_exceeded``, ``too_large``, ``not_found``, ``conflict``, ``busy``,
    ``invalid``, ``hash_mismatch``, ... (the code says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code)


# Refusals that will not change if the transfer is tried again: the result they concern
# is given up (and named in the report's error), not retried (worker/job_delivery.py,
# coordinator/inline_results.py).
REFUSED_FOR_GOOD = frozenset({"forbidden", "invalid", "not_found", "quota_exceeded",
                              "too_large", "conflict", "hash_mismatch"})


class TransferAborted(TransferError):
    """The peer (or the caller) aborted the transfer."""

    code = "aborted"


class TransferStalled(TransferError):
    """No progress for too long: the peer is gone or cannot keep up. Run again to resume."""

    code = "timeout"


@functools.cache
def _wire_codes() -> frozenset[str]:
    from schemas.registry import resolved_schema

    return frozenset(resolved_schema("error")["properties"]["code"]["enum"])


def wire_code(err: TransferError) -> str:
    """The code to answer with: ``err.code`` when schemas/json/error.json knows it, else
    ``internal`` (a storage plug-in's own code must not make the reply unsendable)."""
    return err.code if err.code in _wire_codes() else "internal"
