"""The ``apps.*`` requests: register, list, show and remove applications (docs/data.md,
"Applications"; the store side is ``coordinator.store.apps``).

Each request is admitted by the request guard (role table ``broker/request_roles.py``:
clients and admins; revoked principals refused; the request rate limit) and answered
once (``guarded``), on the requests lane, never on the MQTT network thread.

Rights are those of data objects: the owner reads and changes; a principal the app is
shared with, or anyone for a public app, reads; admins do everything. Registering an app
that names data objects (binaries, a ``docker save`` archive) needs the rights to read
each of them, as a download would (``DataSource.resolve``); they then get a reference
of kind ``app`` that keeps them from garbage collection until the app is removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from broker.acl import Role
from broker.bus import Bus, Incoming, Lane
from broker.transfer import TransferRefused
from coordinator.data_sink import DataSource
from coordinator.errors import NotFound
from coordinator.handling import Refusal, RequestGuard, guarded
from coordinator.store import AppRecord, Store
from coordinator.store.apps import LATEST, Binary, checked_name, checked_spec, checked_version
from schemas.app_messages import (
    AppsAdd,
    AppsList,
    AppsListReply,
    AppsRm,
    AppsShow,
    AppsShowReply,
)
from schemas.messages import Body, Ok

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
REPLY_OVERHEAD = 1024  # bytes of a reply besides its rows (envelope, keys)
SHOW_VERSIONS = 256  # the schema's bound


def wire_app(app: AppRecord, latest: bool | None = None) -> dict[str, Any]:
    """apps.list.reply.json#/definitions/app_item"""
    item: dict[str, Any] = {"id": app.id, "owner": app.owner, "name": app.name,
                            "version": app.version, "kind": app.kind, "access": app.access,
                            "created_at": app.created_at}
    if app.binaries:
        item["binaries"] = {b.platform: {"sha256": b.sha256, "size": b.size}
                            for b in app.binaries}
    for key in ("image", "sha256", "size", "command"):
        value = getattr(app, key)
        if value is not None:
            item[key] = value
    if app.share:
        item["share"] = list(app.share)
    if latest is not None:
        item["latest"] = latest
    return item


class AppRequests:
    """The ``apps.*`` handlers (see the module docstring)."""

    def __init__(self, bus: Bus, store: Store, guard: RequestGuard,
                 source: DataSource) -> None:
        self.bus = bus
        self.store = store
        self.guard = guard
        self.source = source

    def register(self) -> None:
        table: dict[str, Callable[[Incoming], Body]] = {
            "apps.add": self.apps_add,
            "apps.list": self.apps_list,
            "apps.show": self.apps_show,
            "apps.rm": self.apps_rm,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, guarded(self.bus, fn), lane=Lane.REQUESTS)

    def _role(self, sender: str) -> Role:
        return self.guard.role_of(sender) or Role.CLIENT

    # -- requests ---------------------------------------------------------------------------

    def apps_add(self, incoming: Incoming) -> Body:
        req: AppsAdd = incoming.body
        sender = incoming.sender or ""
        share = list(req.share or [])
        access = req.access or ("shared" if share else "private")
        if access == "shared" and not share:
            raise Refusal("invalid", "access shared needs the principals to share with")
        if access != "shared" and share:
            raise Refusal("invalid", f"access {access} takes no share list")
        # The shape first (kind, platforms, hashes): a malformed request is invalid
        # whatever the data it names.
        checked_name(req.name)
        if req.version is not None:
            checked_version(req.version)
        checked_spec(req.kind, [Binary(p, sha, 0) for p, sha in (req.binaries or {}).items()],
                     req.image, req.sha256, 0, req.command)
        binaries: list[Binary] = []
        size: int | None = None
        for platform, sha in sorted((req.binaries or {}).items()):
            binaries.append(Binary(platform, sha, self._readable_size(sender, sha)))
        if req.sha256 is not None:
            size = self._readable_size(sender, req.sha256)
        version = req.version or self.store.next_version(sender, req.name)
        app = self.store.add_app(sender, req.name, version, req.kind, binaries=binaries,
                                 image=req.image, sha256=req.sha256, size=size,
                                 command=req.command, access=access, share=share)
        log.info("%s registered app %s %s (%s)", sender, app.name, app.version, app.kind)
        return Ok(detail={"id": app.id, "owner": app.owner, "name": app.name,
                          "version": app.version, "kind": app.kind})

    def apps_list(self, incoming: Incoming) -> Body:
        req: AppsList = incoming.body
        sender = incoming.sender or ""
        admin = self._role(sender) is Role.ADMIN
        if req.all and not admin:
            raise Refusal("forbidden", f"{sender} is not an admin: only admins list "
                          "everyone's apps")
        offset = req.offset or 0
        limit = req.limit or DEFAULT_LIMIT
        owner = None if req.all else (req.owner or sender)
        if owner is not None and owner != sender and not admin:
            # Another owner's apps: only those this sender may read, paged after filtering.
            everything, _ = self.store.list_apps(owner, name=req.name, limit=10_000)
            visible = [a for a in everything if a.readable_by(sender)]
            records, total = visible[offset:offset + limit], len(visible)
        else:
            records, total = self.store.list_apps(owner, name=req.name, limit=limit,
                                                  offset=offset)
        budget = self.bus.config.max_payload - REPLY_OVERHEAD
        items: list[dict[str, Any]] = []
        for record in records:
            item = wire_app(record)
            budget -= len(json.dumps(item)) + 1
            if budget < 0:
                break
            items.append(item)
        more = offset + len(items) < total
        return AppsListReply(items=items, total=total, offset=offset or None,
                             more=True if more else None)

    def apps_show(self, incoming: Incoming) -> Body:
        req: AppsShow = incoming.body
        sender = incoming.sender or ""
        owner = req.owner or sender
        versions = self.store.app_versions(owner, req.name)
        if not versions:
            raise NotFound(self._missing(sender, owner, req.name, None))
        app = versions[0] if req.version in (None, LATEST) else next(
            (a for a in versions if a.version == req.version), None)
        if app is None:
            raise NotFound(self._missing(sender, owner, req.name, req.version))
        if not app.readable_by(sender) and self._role(sender) is not Role.ADMIN:
            raise Refusal("forbidden", f"{owner}'s app {req.name} is not shared with {sender}")
        names = [a.version for a in versions]
        return AppsShowReply(item=wire_app(app, latest=app is versions[0]),
                             versions=names[:SHOW_VERSIONS],
                             more_versions=True if len(names) > SHOW_VERSIONS else None)

    def apps_rm(self, incoming: Incoming) -> Body:
        req: AppsRm = incoming.body
        sender = incoming.sender or ""
        owner = req.owner or sender
        if owner != sender and self._role(sender) is not Role.ADMIN:
            raise Refusal("forbidden", f"only {owner} (or an admin) may remove {owner}'s apps")
        if bool(req.all) == (req.version is not None):
            raise Refusal("invalid", "give the version to remove, or all to remove every "
                          "version")
        versions = self.store.app_versions(owner, req.name)
        if req.version == LATEST:
            chosen = versions[:1]
        elif req.version is not None:
            chosen = [a for a in versions if a.version == req.version]
        else:
            chosen = versions
        if not chosen:
            raise NotFound(self._missing(sender, owner, req.name, req.version))
        removed = self.store.remove_apps([a.id for a in chosen])
        log.info("%s removed %d version(s) of %s's app %s: %s", sender, removed, owner,
                 req.name, ", ".join(a.version for a in chosen)[:200])
        return Ok(detail={"removed": removed, "name": req.name})

    # -- helpers ----------------------------------------------------------------------------

    def _readable_size(self, sender: str, sha256: str) -> int:
        """The size of data object ``sha256`` if ``sender`` may read it, else a refusal."""
        try:
            entry = self.source.resolve(sender, self._role(sender),
                                        {"kind": "data", "sha256": sha256})
        except TransferRefused as err:
            raise Refusal(err.code, str(err)) from None
        return entry.size

    @staticmethod
    def _missing(sender: str, owner: str, name: str, version: str | None) -> str:
        whose = "you have" if owner == sender else f"{owner} has"
        what = f"app {name}" + (f" version {version}" if version else "")
        return f"{whose} no {what}"
