"""Typed views of the data-object requests (``data.*``; docs/data.md).

Registered in ``schemas.messages.REGISTRY`` like every other message type
(schemas/messages.py imports this module at its end). The bytes themselves travel
through the transfer protocol (``xfer.*``, purpose kind ``data``); these requests list,
show, remove, pin and share what the coordinator holds. ``key`` names a data object by
its owner's name or by its SHA-256 (or a unique prefix of at least 8 hex digits).
Items are plain dicts whose fields the schema bounds
(schemas/json/data.list.reply.json#/definitions/data_item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.messages import Body, message


@message
@dataclass(frozen=True, kw_only=True)
class DataList(Body):
    TYPE: ClassVar[str] = "data.list"
    all: bool | None = None
    limit: int | None = None
    offset: int | None = None


@message
@dataclass(frozen=True, kw_only=True)
class DataListReply(Body):
    TYPE: ClassVar[str] = "data.list.reply"
    items: list[dict[str, Any]]
    total: int
    offset: int | None = None
    more: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class DataShow(Body):
    TYPE: ClassVar[str] = "data.show"
    key: str
    owner: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class DataShowReply(Body):
    TYPE: ClassVar[str] = "data.show.reply"
    item: dict[str, Any]
    refs: list[dict[str, Any]] | None = None
    more_refs: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class DataRm(Body):
    TYPE: ClassVar[str] = "data.rm"
    key: str
    owner: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class DataPin(Body):
    TYPE: ClassVar[str] = "data.pin"
    key: str
    owner: str | None = None
    pin: bool | None = None  # None or True: pin; False: unpin


@message
@dataclass(frozen=True, kw_only=True)
class DataShare(Body):
    TYPE: ClassVar[str] = "data.share"
    key: str
    access: str
    owner: str | None = None
    share: list[str] | None = None
