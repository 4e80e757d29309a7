"""One way to serve a request: run the handler, answer with its result or one error.

Every coordinator request handler goes through ``guarded``, so a given domain error maps
to the same wire code everywhere (docs/protocol.md) and nothing a client sends can
escape as an exception into a bus lane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker.bus import Bus, Incoming
from coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    InvalidArgument,
    NotFound,
    StoreError,
)
from coordinator.reservation_state import ReservationLimitReached, WorkerNotReservable
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
        except Refusal as err:
            bus.reply_error(incoming, err.code, str(err)[:4096], err.detail)
        except NotFound as err:
            bus.reply_error(incoming, "not_found", str(err))
        except (AlreadyExists, WorkerNotReservable, ReservationLimitReached) as err:
            bus.reply_error(incoming, "conflict", str(err))
        except InvalidArgument as err:
            bus.reply_error(incoming, "invalid", str(err))
        except StoreError as err:
            log.error("%s from %s: %s", incoming.message.type, incoming.sender, err)
            bus.reply_error(incoming, "internal", "the coordinator cannot reach its database")
        except Exception:
            log.exception("%s from %s failed", incoming.message.type, incoming.sender)
            bus.reply_error(incoming, "internal", "the coordinator failed to serve this request")
        else:
            bus.reply(incoming, reply)

    return run
