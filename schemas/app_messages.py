"""Typed views of the application requests (``apps.*``; docs/data.md, "Applications").

Registered in ``schemas.messages.REGISTRY`` like every other message type
(schemas/messages.py imports this module at its end). An app version is per-platform
``binaries`` (data objects by SHA-256), an ``image`` the workers hold, an
``image_archive`` (a ``docker save`` tar stored as data, ``sha256``) or a ``command``.
Items are plain dicts whose fields the schema bounds
(schemas/json/apps.list.reply.json#/definitions/app_item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.messages import Body, message


@message
@dataclass(frozen=True, kw_only=True)
class AppsAdd(Body):
    TYPE: ClassVar[str] = "apps.add"
    name: str
    kind: str
    version: str | None = None  # None: 1, or one above the highest number
    binaries: dict[str, str] | None = None  # platform -> sha256
    image: str | None = None
    sha256: str | None = None
    command: str | None = None
    access: str | None = None
    share: list[str] | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AppsList(Body):
    TYPE: ClassVar[str] = "apps.list"
    all: bool | None = None
    owner: str | None = None
    name: str | None = None
    limit: int | None = None
    offset: int | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AppsListReply(Body):
    TYPE: ClassVar[str] = "apps.list.reply"
    items: list[dict[str, Any]]
    total: int
    offset: int | None = None
    more: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AppsShow(Body):
    TYPE: ClassVar[str] = "apps.show"
    name: str
    version: str | None = None  # None or "latest": the highest
    owner: str | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AppsShowReply(Body):
    TYPE: ClassVar[str] = "apps.show.reply"
    item: dict[str, Any]
    versions: list[str] | None = None
    more_versions: bool | None = None


@message
@dataclass(frozen=True, kw_only=True)
class AppsRm(Body):
    TYPE: ClassVar[str] = "apps.rm"
    name: str
    version: str | None = None
    all: bool | None = None
    owner: str | None = None
