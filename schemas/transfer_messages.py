"""Typed views of the transfer control messages (``xfer.*``; docs/transfer.md).

Registered in ``schemas.messages.REGISTRY`` like every other message type
(schemas/messages.py imports this module at its end). The segments themselves are not
messages: they travel as raw bytes with their metadata in the topic
(``broker.transfer.segments``).

Byte ranges are ``[start, end)`` pairs (``list[list[int]]`` on the wire, at most 256;
``more`` says a list was cut short). ``purpose``/``source`` and ``ref`` stay plain dicts
whose fields the schema bounds (schemas/json/xfer.init.json#/definitions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.messages import Body, message


@message
@dataclass(frozen=True, kw_only=True)
class XferInit(Body):
    """Offer a file (upload), or describe one (the reply to ``xfer.fetch``)."""

    TYPE: ClassVar[str] = "xfer.init"
    tid: str
    direction: str  # "upload" | "download"
    name: str
    size: int
    sha256: str
    segment_size: int
    purpose: dict[str, Any]


@message
@dataclass(frozen=True, kw_only=True)
class XferState(Body):
    """The receiver's durable ranges, or ``complete`` with what it made of the file."""

    TYPE: ClassVar[str] = "xfer.state"
    tid: str
    state: str  # "receiving" | "complete"
    size: int | None = None
    have: list[list[int]] | None = None
    more: bool | None = None
    ref: dict[str, Any] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class XferAck(Body):
    """Cumulative durable ranges, receiver to sender (not a reply)."""

    TYPE: ClassVar[str] = "xfer.ack"
    tid: str
    have: list[list[int]]
    more: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class XferStatus(Body):
    TYPE: ClassVar[str] = "xfer.status"
    tid: str


@message
@dataclass(frozen=True, kw_only=True)
class XferFin(Body):
    TYPE: ClassVar[str] = "xfer.fin"
    tid: str
    size: int
    sha256: str


@message
@dataclass(frozen=True, kw_only=True)
class XferAbort(Body):
    TYPE: ClassVar[str] = "xfer.abort"
    tid: str
    reason: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class XferFetch(Body):
    """Ask a holder for a file: describe it, and stream the ``ranges``/``bitmap`` missing."""

    TYPE: ClassVar[str] = "xfer.fetch"
    tid: str
    source: dict[str, Any]
    ranges: list[list[int]] | None = None
    bitmap: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class WorkdirFetch(Body):
    """A reservation's holder asks its worker to place a data object of the coordinator's
    store in the work directory (worker/workdir_fetch.py); not an ``xfer.*`` message: the
    worker fetches the bytes itself, through its input cache."""

    TYPE: ClassVar[str] = "workdir.fetch"
    reservation: str
    grant: str
    sha256: str
    path: str
    name: str | None = None
    mode: int | None = None
