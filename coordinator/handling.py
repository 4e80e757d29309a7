"""One way to serve a request: run the handler, answer with its result or one error.

Every coordinator request handler goes through ``guarded``, so a given domain error maps
to the same wire code everywhere (each error class declares its ``code``; docs/protocol.md
lists them) and nothing a client sends can escape as an exception into a bus lane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker.bus import Bus, Incoming
from coordinator.errors import CoordinatorError, StoreError
from schemas.messages import Body

log = logging.getLogger(__name__)

Handler = Callable[[Incoming], Body]


class Refusal(CoordinatorError):
    """A request the rules refuse; ``code`` is the wire error code (docs/protocol.md)."""

    def __init__(self, code: str, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def guarded(bus: Bus, fn: Handler) -> Callable[[Incoming], None]:
    """``fn`` as a bus handler that always sends exactly one reply."""

    def run(incoming: Incoming) -> None:
        if incoming.sender is None:
            return
        try:
            reply = fn(incoming)
        except CoordinatorError as err:
            if isinstance(err, StoreError):
                log.error("%s from %s: %s", incoming.message.type, incoming.sender, err)
            bus.reply_error(incoming, err.code, err.wire_message(), err.detail)
        except Exception:
            log.exception("%s from %s failed", incoming.message.type, incoming.sender)
            bus.reply_error(incoming, "internal", "the coordinator failed to serve this request")
        else:
            bus.reply(incoming, reply)

    return run
