"""What the bus speaks in: its lanes, its errors, the messages handlers get, wills.

Apart from ``broker/bus.py`` so that services can name these without the client class;
``broker.bus`` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from schemas.codec import Envelope
from schemas.errors import XcloudError
from schemas.messages import Body, Error


class Lane(StrEnum):
    """The bus's handler threads: one thread and one queue per lane, order kept within a
    lane. An enum, so that a misspelt lane fails at once instead of silently starting a
    thread of its own."""

    DEFAULT = "default"
    INBOX = "inbox"  # the inbox dispatcher itself (cheap handlers may run on it)
    CONNECT = "connect"  # on-(re)connect hooks
    REGISTRY = "registry"  # worker caps and status
    HEARTBEAT = "heartbeat"  # heartbeat ingest
    REQUESTS = "requests"  # quick coordinator requests
    ADMIN = "admin"  # principal administration
    RESERVATIONS = "reservations"  # reservation protocol
    RESERVE = "reserve"  # reserve requests that wait on a worker
    EXEC = "exec"  # remote command protocol (worker and client sides)
    EVENTS = "events"  # event watchers
    TRANSFER = "transfer"  # data transfers
    JOBS = "jobs"  # batch jobs


class BusError(XcloudError):
    """The broker could not be reached, refused us, or a request failed."""


class RequestTimeout(BusError):
    """No reply arrived in time (the peer is down, busy, or refused our message)."""


class MessageTooLarge(BusError):
    """A message over ``bus.max_payload``: refused before it reaches the broker."""

    code = "too_large"

    def __init__(self, size: int, limit: int, topic: str) -> None:
        super().__init__(f"a message of {size} bytes to {topic} is over the bus limit of "
                         f"{limit} bytes (bus.max_payload)")
        self.size = size
        self.limit = limit
        self.topic = topic


class RemoteError(BusError):
    """The peer answered a request with an ``error`` message."""

    def __init__(self, error: Error, request_type: str) -> None:
        super().__init__(error.message)
        self.code = error.code
        self.error = error
        self.request_type = request_type


@dataclass(frozen=True)
class Incoming:
    """A validated message as a handler sees it."""

    topic: str
    message: Envelope[Any]
    sender: str | None  # authenticated sender (inbox topics only)
    retained: bool = False
    received_at: float = 0.0  # time.monotonic() when paho read it (0: unknown)

    @property
    def body(self) -> Any:
        return self.message.body


Handler = Callable[[Incoming], None]
RawHandler = Callable[[str, bytes, bool], None]


@dataclass(frozen=True)
class Will:
    topic: str
    body: Body
    qos: int = 1
    retain: bool = True
