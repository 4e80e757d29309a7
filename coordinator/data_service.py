"""The coordinator's data service: the transfer endpoint for data objects, the ``data.*``
requests, and garbage collection (docs/data.md).

Uploads and downloads are the transfer engine's (``broker/transfer``) with the
coordinator's storage plugged in (``coordinator.data_sink``). The endpoint is created
with the service, before the coordinator's bus starts, as the engine requires.

Requests, each admitted by the request guard (roles, revocation, rate limits) and
answered once: ``data.list`` (a page; admins may list everyone's), ``data.show``,
``data.rm``, ``data.pin`` (and unpin) and ``data.share``. Reading needs the rights of a
download; changing needs to be the owner or an admin.

Garbage collection runs every ``coordinator.data_gc_s`` seconds in a thread of its own:
names past their expiry that nothing pins go, then objects no name and no reference
keeps (row first, then the file), then partial files that no transfer record names
(older than ``data_partial_grace_s``). Unfinished transfers themselves idle out in the
engine (``idle_expiry_s``). It logs what it freed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.acl import Role
from broker.bus import Bus, Incoming, Lane
from broker.config import Config
from broker.request_roles import Limit
from broker.transfer import TransferEndpoint, TransferRefused, TransferSettings
from coordinator.data_sink import (
    DataFiles,
    DataSink,
    DataSource,
    Quota,
    human_bytes,
    partial_key,
)
from coordinator.errors import NotFound
from coordinator.handling import Refusal, RequestGuard, guarded
from coordinator.store import DataRecord, Store
from coordinator.store.data import valid_sha256
from schemas.data_messages import (
    DataList,
    DataListReply,
    DataPin,
    DataRm,
    DataShare,
    DataShow,
    DataShowReply,
)
from schemas.messages import Body, Ok

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
REPLY_OVERHEAD = 1024  # bytes of a reply besides its rows (envelope, keys)
SHOW_REFS = 64  # the schema's bound


def wire_item(entry: DataRecord) -> dict[str, Any]:
    """data.list.reply.json#/definitions/data_item"""
    item: dict[str, Any] = {
        "id": entry.id, "owner": entry.owner, "name": entry.name, "sha256": entry.sha256,
        "size": entry.size, "access": entry.access, "created_at": entry.created_at,
        "last_used_at": entry.last_used_at, "pinned": entry.pinned}
    if entry.share:
        item["share"] = list(entry.share)
    if entry.expires_at is not None:
        item["expires_at"] = entry.expires_at
    return item


@dataclass
class GcResult:
    """What one garbage-collection pass freed."""

    expired: list[str] = field(default_factory=list)  # owner/name of expired names
    objects: list[str] = field(default_factory=list)  # sha256 of deleted objects
    freed_bytes: int = 0
    partials: list[str] = field(default_factory=list)  # stale partial files deleted


class DataService:
    """Data objects on the coordinator's bus (see the module docstring)."""

    def __init__(self, bus: Bus, store: Store, config: Config, guard: RequestGuard, *,
                 settings: TransferSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.store = store
        self.guard = guard
        self.gc_s = config.coordinator.data_gc_s
        self.partial_grace_s = config.coordinator.data_partial_grace_s
        self.files = DataFiles(Path(config.data_dir))
        self.lock = threading.Lock()  # storage vs garbage collection
        # Transfers that trigger work draw from the sender's request bucket too.
        rate = guard.buckets[Limit.REQUESTS].take
        self._clock = clock
        self.sink = DataSink(store, self.files,
                             Quota(config.coordinator.data_quota_bytes,
                                   config.coordinator.data_admin_quota_bytes),
                             guard.role_of, self.lock, clock=clock, rate=rate)
        self.source = DataSource(store, self.files, guard.role_of, rate=rate)
        self.endpoint = TransferEndpoint(bus, sink=self.sink, source=self.source,
                                         settings=settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> None:
        table: dict[str, Callable[[Incoming], Body]] = {
            "data.list": self.data_list,
            "data.show": self.data_show,
            "data.rm": self.data_rm,
            "data.pin": self.data_pin,
            "data.share": self.data_share,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, guarded(self.bus, fn), lane=Lane.REQUESTS)

    def start(self) -> None:
        if self.gc_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run_gc, daemon=True,
                                            name="data-gc")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.endpoint.close()

    # -- requests ---------------------------------------------------------------------------

    def data_list(self, incoming: Incoming) -> Body:
        req: DataList = incoming.body
        sender = incoming.sender or ""
        if req.all and self.guard.role_of(sender) is not Role.ADMIN:
            raise Refusal("forbidden", f"{sender} is not an admin: only admins list "
                          "everyone's data")
        offset = req.offset or 0
        records, total = self.store.list_data(None if req.all else sender,
                                              limit=req.limit or DEFAULT_LIMIT, offset=offset)
        budget = self.bus.config.max_payload - REPLY_OVERHEAD
        items: list[dict[str, Any]] = []
        for record in records:
            item = wire_item(record)
            budget -= len(json.dumps(item)) + 1
            if budget < 0:
                break
            items.append(item)
        more = offset + len(items) < total
        return DataListReply(items=items, total=total, offset=offset or None,
                             more=True if more else None)

    def data_show(self, incoming: Incoming) -> Body:
        req: DataShow = incoming.body
        entry = self._readable(incoming.sender or "", req.key, req.owner)
        refs = self.store.data_refs(entry.sha256)
        rows = [{"kind": kind, "ref": ref, "owner": owner}
                for kind, ref, owner in refs[:SHOW_REFS]]
        return DataShowReply(item=wire_item(entry), refs=rows or None,
                             more_refs=True if len(refs) > SHOW_REFS else None)

    def data_rm(self, incoming: Incoming) -> Body:
        req: DataRm = incoming.body
        entries = self._owned(incoming.sender or "", req.key, req.owner)
        pinned = [e for e in entries if e.pinned]
        if pinned:
            raise Refusal("conflict", f"{pinned[0].name} is pinned: unpin it first "
                          "(`xcloud data unpin`)")
        removed = self.store.remove_data([e.id for e in entries])
        log.info("%s removed %d data name(s) of %s: %s", incoming.sender, removed,
                 entries[0].owner, ", ".join(e.name for e in entries)[:200])
        return Ok(detail={"removed": removed, "sha256": entries[0].sha256})

    def data_pin(self, incoming: Incoming) -> Body:
        req: DataPin = incoming.body
        entries = self._owned(incoming.sender or "", req.key, req.owner)
        shas = sorted({e.sha256 for e in entries})
        owner = entries[0].owner
        for sha in shas:
            if req.pin is False:
                self.store.remove_data_ref(sha, "pin", owner)
            else:
                self.store.add_data_ref(sha, "pin", owner, owner)
        return Ok(detail={"sha256": shas[0], "pinned": req.pin is not False})

    def data_share(self, incoming: Incoming) -> Body:
        req: DataShare = incoming.body
        share = list(req.share or [])
        if req.access == "shared" and not share:
            raise Refusal("invalid", "access shared needs the principals to share with")
        if req.access != "shared" and share:
            raise Refusal("invalid", f"access {req.access} takes no share list")
        entries = self._owned(incoming.sender or "", req.key, req.owner)
        self.store.set_data_access([e.id for e in entries], req.access, share)
        return Ok(detail={"access": req.access, "shared": len(share),
                          "sha256": entries[0].sha256})

    # -- resolving keys ---------------------------------------------------------------------

    def _readable(self, sender: str, key: str, owner: str | None) -> DataRecord:
        role = self.guard.role_of(sender) or Role.CLIENT
        found = self.store.find_data(owner or sender, key)
        try:
            if found:
                entry = found[0]
                if entry.readable_by(sender) or role is Role.ADMIN:
                    return entry
                raise Refusal("forbidden", f"{entry.owner}'s {key!r} is not shared with "
                              f"{sender}")
            if owner is None and valid_sha256(key):
                return self.source.resolve(sender, role, {"kind": "data", "sha256": key})
        except TransferRefused as err:
            raise Refusal(err.code, str(err)) from None
        whose = "you have" if (owner or sender) == sender else f"{owner} has"
        raise NotFound(f"{whose} no data named or hashed {key!r}")

    def _owned(self, sender: str, key: str, owner: str | None) -> list[DataRecord]:
        target = owner or sender
        if target != sender and self.guard.role_of(sender) is not Role.ADMIN:
            raise Refusal("forbidden", f"only {target} (or an admin) may change {target}'s "
                          "data")
        found = self.store.find_data(target, key)
        if not found:
            whose = "you have" if target == sender else f"{target} has"
            raise NotFound(f"{whose} no data named or hashed {key!r}")
        if len({e.sha256 for e in found}) > 1:
            raise Refusal("conflict", f"{key!r} matches several objects: give more of the "
                          "hash, or the name")
        return found

    # -- garbage collection -----------------------------------------------------------------

    def _run_gc(self) -> None:
        while not self._stop.wait(self.gc_s):
            try:
                self.collect_garbage()
            except Exception:
                log.exception("data garbage collection failed; trying again later")

    def collect_garbage(self, now: float | None = None) -> GcResult:
        """One pass (see the module docstring); returns what it freed."""
        now = self._clock() if now is None else now
        result = GcResult()
        with self.lock:
            for entry in self.store.expire_data(now):
                result.expired.append(f"{entry.owner}/{entry.name}")
            for obj in self.store.unreferenced_objects():
                if not self.store.forget_object(obj.sha256):
                    continue
                self.files.object_path(obj.sha256).unlink(missing_ok=True)
                result.objects.append(obj.sha256)
                result.freed_bytes += obj.size
            keep = {partial_key(peer, tid) for peer, tid in self.store.transfer_ids()}
            for path in self.files.partial.glob("*.part"):
                try:
                    old = now - path.stat().st_mtime > self.partial_grace_s
                except OSError:
                    continue
                if path.stem not in keep and old:
                    path.unlink(missing_ok=True)
                    result.partials.append(path.name)
        if result.expired or result.objects or result.partials:
            log.info("data garbage collection: %d expired name(s), %d object(s) freed "
                     "(%s), %d stale partial file(s)", len(result.expired),
                     len(result.objects), human_bytes(result.freed_bytes),
                     len(result.partials))
        return result
