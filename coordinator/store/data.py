"""Data objects: content-addressed bytes, the names principals give them, what keeps them
alive, and the records of incoming transfers (docs/data.md).

Three tables make the model:

- ``xc_data_object``: one row per SHA-256 the coordinator holds (size, created, last
  used). The bytes are files under the data directory, never in the database.
- ``xc_data_entry``: a principal's name for an object, with its rights (``private``,
  ``shared`` with named principals, ``public``) and an optional expiry. Names are unique
  per owner; the same content under several names or owners is stored once.
- ``xc_data_ref``: what else keeps an object alive: pins now, jobs and apps later
  (``kind``). An object is garbage once no entry and no reference names it.

Quota: a principal uses the sum of the sizes of the distinct objects its entries name,
plus what its unfinished uploads reserved (``xc_transfer`` rows still receiving).

``xc_transfer`` keeps the transfer engine's ``TransferRecord`` of each incoming upload;
``save_transfer_have`` is the one-column UPDATE the engine makes before every
acknowledgement.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peewee import JOIN

from coordinator.errors import InvalidArgument, NotFound
from coordinator.models import DATA_NAME_MAX, ID_MAX, RID_MAX, TOPIC_MAX
from coordinator.store.engine import StoreBase, op
from coordinator.store.values import checked_text, dumps, loads, now_or

log = logging.getLogger(__name__)

ACCESS = ("private", "shared", "public")
REF_KINDS = ("pin", "job", "app")
SHA256_HEX = frozenset("0123456789abcdef")
RECEIVING = "receiving"


def valid_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= SHA256_HEX


@dataclass(frozen=True, slots=True)
class DataRecord:
    """One named data object as its owner sees it."""

    id: str
    owner: str
    name: str
    sha256: str
    size: int
    access: str
    share: tuple[str, ...]
    created_at: float
    last_used_at: float
    expires_at: float | None
    pinned: bool = False

    def readable_by(self, principal: str) -> bool:
        """May ``principal`` read these bytes under this entry's rights (admins aside)?"""
        return (principal == self.owner or self.access == "public"
                or (self.access == "shared" and principal in self.share))


@dataclass(frozen=True, slots=True)
class DataObjectRecord:
    sha256: str
    size: int
    created_at: float
    last_used_at: float


def _entry(row: Any, pinned: bool = False) -> DataRecord:
    share = loads(row.share, [])
    return DataRecord(id=row.id, owner=row.owner, name=row.name, sha256=row.sha256,
                      size=int(row.size), access=row.access,
                      share=tuple(str(p) for p in share if isinstance(p, str)),
                      created_at=row.created_at, last_used_at=row.last_used_at,
                      expires_at=row.expires_at, pinned=pinned)


def _checked_access(access: str, share: Sequence[str]) -> tuple[str, list[str]]:
    if access not in ACCESS:
        raise InvalidArgument(f"access must be one of {', '.join(ACCESS)}, not {access!r}")
    names = sorted({checked_text(p, "principal id", ID_MAX) for p in share})
    if len(names) > 64:
        raise InvalidArgument("a data object is shared with at most 64 principals")
    if access != "shared":
        names = []
    return access, names


class DataStore(StoreBase):
    """Data objects, names, references, quota usage and transfer records."""

    # -- objects and names --------------------------------------------------------------

    @op
    def data_object(self, sha256: str) -> DataObjectRecord | None:
        Obj = self.models.DataObject
        row = Obj.get_or_none(Obj.sha256 == sha256)
        if row is None:
            return None
        return DataObjectRecord(row.sha256, int(row.size), row.created_at, row.last_used_at)

    @op
    def put_data(self, owner: str, name: str, sha256: str, size: int, *,
                 access: str = "private", share: Sequence[str] = (),
                 expires_at: float | None = None, now: float | None = None) -> DataRecord:
        """Name ``sha256`` ``name`` for ``owner`` (creating the object row when new);
        an existing name of the owner now points at this content, with these rights."""
        checked_text(owner, "owner", ID_MAX)
        checked_text(name, "data name", DATA_NAME_MAX)
        if not valid_sha256(sha256):
            raise InvalidArgument("sha256 must be 64 lowercase hex digits")
        access, names = _checked_access(access, share)
        t = now_or(now)
        sql = self._sql  # every upload and every kept result comes here: compiled SQL
        shared = dumps(names)
        with self.db.atomic():
            if sql.tuples("SELECT 1 FROM {objects} WHERE {sha256} = {?}", sha256):
                sql.run("UPDATE {objects} SET {last_used_at} = {?} WHERE {sha256} = {?}",
                        t, sha256)
            else:  # (an UPDATE's count is no test: MySQL counts changed rows only)
                sql.run("INSERT INTO {objects} ({sha256}, {size}, {created_at}, "
                        "{last_used_at}) VALUES ({?}, {?}, {?}, {?})", sha256, size, t, t)
            rows = sql.tuples("SELECT {id}, {created_at} FROM {entries} WHERE {owner} = {?} "
                              "AND {name} = {?}{lock}", owner, name)
            if rows:
                eid, created = rows[0]
                sql.run("UPDATE {entries} SET {sha256} = {?}, {size} = {?}, {access} = {?}, "
                        "{share} = {?}, {last_used_at} = {?}, {expires_at} = {?} "
                        "WHERE {id} = {?}", sha256, size, access, shared, t, expires_at, eid)
            else:
                eid, created = uuid.uuid4().hex[:16], t
                sql.run("INSERT INTO {entries} ({id}, {owner}, {name}, {sha256}, {size}, "
                        "{access}, {share}, {created_at}, {last_used_at}, {expires_at}) "
                        "VALUES ({?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?}, {?})",
                        eid, owner, name, sha256, size, access, shared, t, t, expires_at)
            pinned = self._pinned(owner, sha256)
        return DataRecord(id=str(eid), owner=owner, name=name, sha256=sha256, size=int(size),
                          access=access, share=tuple(names), created_at=float(created),
                          last_used_at=t, expires_at=expires_at, pinned=pinned)

    def _pinned(self, owner: str, sha256: str) -> bool:
        return bool(self._sql.tuples(
            "SELECT 1 FROM {refs} WHERE {sha256} = {?} AND {kind} = 'pin' AND {ref_id} = {?}",
            sha256, owner))

    @op
    def data_entries(self, sha256: str) -> list[DataRecord]:
        """Every name of the object ``sha256`` (for rights checks)."""
        Entry = self.models.DataEntry
        return [_entry(row) for row in Entry.select().where(Entry.sha256 == sha256)
                .order_by(Entry.owner, Entry.name)]

    @op
    def holds_data(self, owner: str, sha256: str) -> bool:
        """Does ``owner`` name ``sha256`` already? One probe of the (sha256, owner) index,
        whatever the number of names the content has (a popular output of a sweep)."""
        return bool(self._sql.tuples(  # (every upload and small result asks: compiled)
            "SELECT 1 FROM {entries} WHERE {sha256} = {?} AND {owner} = {?} LIMIT 1",
            sha256, owner))

    @op
    def first_data_entry(self, sha256: str) -> DataRecord | None:
        """One name of ``sha256`` (the first by owner and name), or None."""
        Entry = self.models.DataEntry
        row = (Entry.select().where(Entry.sha256 == sha256)
               .order_by(Entry.owner, Entry.name).first())
        return None if row is None else _entry(row)

    @op
    def readable_data_entry(self, sha256: str, principal: str) -> DataRecord | None:
        """The entry of ``sha256`` that ``principal`` reads it under: its own first (by
        name), else the first public or shared-with-it one by owner and name; None when
        none (``first_data_entry`` tells an absent object from a private one). Reads
        the reader's own names one index probe; of others', only public and shared ones."""
        Entry = self.models.DataEntry
        own = (Entry.select().where((Entry.sha256 == sha256) & (Entry.owner == principal))
               .order_by(Entry.name).first())
        if own is not None:
            return _entry(own)
        for row in (Entry.select().where((Entry.sha256 == sha256)
                                         & (Entry.access << ("public", "shared")))
                    .order_by(Entry.owner, Entry.name)):
            entry = _entry(row)
            if entry.readable_by(principal):
                return entry
        return None

    @op
    def find_data(self, owner: str, key: str) -> list[DataRecord]:
        """``owner``'s entries named ``key``, or holding the content ``key`` (a hash, or
        a unique hash prefix of at least 8 digits); empty when none."""
        Entry = self.models.DataEntry
        rows = list(Entry.select().where((Entry.owner == owner) & (Entry.name == key)))
        if not rows and 8 <= len(key) <= 64 and set(key) <= SHA256_HEX:
            cond = (Entry.sha256 == key) if len(key) == 64 else Entry.sha256.startswith(key)
            rows = list(Entry.select().where((Entry.owner == owner) & cond)
                        .order_by(Entry.name))
        return [_entry(row, self._pinned(owner, row.sha256)) for row in rows]

    @op
    def list_data(self, owner: str | None, *, limit: int = 100, offset: int = 0
                  ) -> tuple[list[DataRecord], int]:
        """A page of entries (one owner's, or everyone's for None) by owner and name,
        and how many there are in all."""
        Entry, Ref = self.models.DataEntry, self.models.DataRef
        query = Entry.select()
        if owner is not None:
            query = query.where(Entry.owner == owner)
        total = query.count()
        rows = list(query.order_by(Entry.owner, Entry.name).limit(limit).offset(offset))
        pins = {(r.sha256, r.ref_id) for r in Ref.select(Ref.sha256, Ref.ref_id).where(
            (Ref.kind == "pin") & Ref.sha256.in_([row.sha256 for row in rows] or [""]))}
        return [_entry(row, (row.sha256, row.owner) in pins) for row in rows], total

    @op
    def remove_data(self, entry_ids: Sequence[str]) -> int:
        """Delete these entries (the bytes go with the next garbage collection once
        nothing else names them); returns how many were deleted."""
        Entry = self.models.DataEntry
        if not entry_ids:
            return 0
        return int(Entry.delete().where(Entry.id.in_(list(entry_ids))).execute())

    @op
    def set_data_access(self, entry_ids: Sequence[str], access: str,
                        share: Sequence[str] = ()) -> int:
        access, names = _checked_access(access, share)
        Entry = self.models.DataEntry
        if not entry_ids:
            return 0
        return int(Entry.update(access=access, share=dumps(names))
                   .where(Entry.id.in_(list(entry_ids))).execute())

    @op
    def touch_data(self, sha256: str, *, now: float | None = None) -> None:
        """Mark the object used (a download)."""
        t = now_or(now)
        Obj, Entry = self.models.DataObject, self.models.DataEntry
        Obj.update(last_used_at=t).where(Obj.sha256 == sha256).execute()
        Entry.update(last_used_at=t).where(Entry.sha256 == sha256).execute()

    # -- references -----------------------------------------------------------------------

    @op
    def add_data_ref(self, sha256: str, kind: str, ref_id: str, owner: str, *,
                     now: float | None = None) -> bool:
        """Keep ``sha256`` alive for ``(kind, ref_id)``; False if it already was."""
        if kind not in REF_KINDS:
            raise InvalidArgument(f"reference kind must be one of {', '.join(REF_KINDS)}")
        checked_text(ref_id, "reference id", ID_MAX)
        Obj, Ref = self.models.DataObject, self.models.DataRef
        with self.db.atomic():
            if Obj.get_or_none(Obj.sha256 == sha256) is None:
                raise NotFound(f"no data object {sha256[:12]}…")
            if Ref.get_or_none((Ref.sha256 == sha256) & (Ref.kind == kind)
                               & (Ref.ref_id == ref_id)) is not None:
                return False
            Ref.insert(sha256=sha256, kind=kind, ref_id=ref_id, owner=owner,
                       created_at=now_or(now)).execute()
        return True

    @op
    def remove_data_ref(self, sha256: str, kind: str, ref_id: str) -> bool:
        Ref = self.models.DataRef
        return bool(Ref.delete().where((Ref.sha256 == sha256) & (Ref.kind == kind)
                                       & (Ref.ref_id == ref_id)).execute())

    @op
    def data_refs(self, sha256: str) -> list[tuple[str, str, str]]:
        """``(kind, ref_id, owner)`` of every reference to ``sha256``."""
        Ref = self.models.DataRef
        return [(r.kind, r.ref_id, r.owner) for r in Ref.select().where(Ref.sha256 == sha256)
                .order_by(Ref.kind, Ref.ref_id)]

    # -- quota ------------------------------------------------------------------------------

    @op
    def data_usage(self, owner: str, *, exclude_tid: str | None = None) -> tuple[int, int]:
        """``(stored, reserved)`` bytes of ``owner``: the distinct objects its names hold,
        and its uploads still receiving (but ``exclude_tid``)."""
        return self.data_stored(owner), self.data_reserved(owner, exclude_tid=exclude_tid)

    @op
    def data_stored(self, owner: str) -> int:
        """The bytes of the distinct objects ``owner``'s names hold: a read of all its
        names (11 ms with 10,000 of them), so the sink keeps it (coordinator/data_sink.py)."""
        ((stored,),) = self._sql.tuples(
            "SELECT COALESCE(SUM({mine}.{size}), 0) FROM (SELECT DISTINCT {sha256}, {size} "
            "FROM {entries} WHERE {owner} = {?}) {mine}", owner)
        return int(stored or 0)

    @op
    def data_reserved(self, owner: str, *, exclude_tid: str | None = None) -> int:
        """The bytes ``owner``'s uploads still receiving reserve (but ``exclude_tid``)."""
        ((pending,),) = self._sql.tuples(
            "SELECT COALESCE(SUM({size}), 0) FROM {transfers} WHERE {peer} = {?} AND "
            "{phase} = {?} AND {direction} = 'upload' AND {tid} != {?}",
            owner, RECEIVING, exclude_tid if exclude_tid is not None else "")
        return int(pending or 0)

    # -- garbage ------------------------------------------------------------------------------

    @op
    def expire_data(self, now: float | None = None) -> list[DataRecord]:
        """Delete the entries past their expiry whose object no reference keeps alive
        (a pin keeps its owner's names); returns what was deleted."""
        t = now_or(now)
        Entry, Ref = self.models.DataEntry, self.models.DataRef
        rows = list(Entry.select().where(Entry.expires_at.is_null(False)
                                         & (Entry.expires_at <= t)).limit(1000))
        gone: list[DataRecord] = []
        for row in rows:
            if Ref.select().where(Ref.sha256 == row.sha256).exists():
                continue
            Entry.delete().where((Entry.id == row.id) & (Entry.expires_at <= t)).execute()
            gone.append(_entry(row))
        return gone

    @op
    def unreferenced_objects(self, limit: int = 1000) -> list[DataObjectRecord]:
        """Objects that no entry and no reference name."""
        Obj, Entry, Ref = self.models.DataObject, self.models.DataEntry, self.models.DataRef
        query = (Obj.select(Obj).join(Entry, JOIN.LEFT_OUTER, on=(Entry.sha256 == Obj.sha256))
                 .switch(Obj).join(Ref, JOIN.LEFT_OUTER, on=(Ref.sha256 == Obj.sha256))
                 .where(Entry.id.is_null() & Ref.sha256.is_null()).limit(limit))
        return [DataObjectRecord(r.sha256, int(r.size), r.created_at, r.last_used_at)
                for r in query]

    @op
    def forget_object(self, sha256: str) -> bool:
        """Delete the object row if still unreferenced (checked in the same transaction)."""
        Obj, Entry, Ref = self.models.DataObject, self.models.DataEntry, self.models.DataRef
        with self.db.atomic():
            if (Entry.select().where(Entry.sha256 == sha256).exists()
                    or Ref.select().where(Ref.sha256 == sha256).exists()):
                return False
            return bool(Obj.delete().where(Obj.sha256 == sha256).execute())

    # -- transfer records -----------------------------------------------------------------

    @op
    def save_transfer(self, fields: dict[str, Any]) -> None:
        """Insert or replace the record ``(peer, tid)`` (a ``TransferRecord.to_json()``)."""
        checked_text(fields.get("peer"), "transfer peer", ID_MAX)
        checked_text(fields.get("tid"), "transfer id", RID_MAX)
        checked_text(fields.get("peer_inbox"), "transfer inbox", TOPIC_MAX)
        Xfer = self.models.TransferRow
        row = {"peer_inbox": fields["peer_inbox"], "direction": fields["direction"],
               "name": str(fields["name"])[:DATA_NAME_MAX], "size": int(fields["size"]),
               "sha256": fields["sha256"], "segment_size": int(fields["segment_size"]),
               "purpose": dumps(fields.get("purpose") or {}),
               "have": dumps(fields.get("have") or []), "phase": fields["phase"],
               "ref": None if fields.get("ref") is None else dumps(fields["ref"]),
               "created_at": float(fields["created_at"]),
               "updated_at": float(fields["updated_at"])}
        key = (Xfer.peer == fields["peer"]) & (Xfer.tid == fields["tid"])
        with self.db.atomic():
            if Xfer.update(**row).where(key).execute() == 0 and not Xfer.select().where(
                    key).exists():
                Xfer.insert(peer=fields["peer"], tid=fields["tid"], **row).execute()

    @op
    def save_transfer_have(self, peer: str, tid: str, have: list[list[int]],
                           updated_at: float) -> None:
        """The ranges of ``(peer, tid)`` grew: one UPDATE of one row."""
        Xfer = self.models.TransferRow
        Xfer.update(have=dumps(have), updated_at=updated_at).where(
            (Xfer.peer == peer) & (Xfer.tid == tid)).execute()

    @op
    def load_transfers(self) -> list[dict[str, Any]]:
        """Every stored record as ``TransferRecord.from_json`` takes it."""
        Xfer = self.models.TransferRow
        out = []
        for row in Xfer.select().order_by(Xfer.created_at):
            out.append({"tid": row.tid, "peer": row.peer, "peer_inbox": row.peer_inbox,
                        "direction": row.direction, "name": row.name, "size": int(row.size),
                        "sha256": row.sha256, "segment_size": int(row.segment_size),
                        "purpose": loads(row.purpose, {}), "have": loads(row.have, []),
                        "phase": row.phase, "ref": loads(row.ref, None),
                        "created_at": row.created_at, "updated_at": row.updated_at})
        return out

    @op
    def drop_transfer(self, peer: str, tid: str) -> None:
        Xfer = self.models.TransferRow
        Xfer.delete().where((Xfer.peer == peer) & (Xfer.tid == tid)).execute()

    @op
    def transfer_ids(self) -> list[tuple[str, str]]:
        """``(peer, tid)`` of every stored transfer (partial files to keep)."""
        Xfer = self.models.TransferRow
        return [(r.peer, r.tid) for r in Xfer.select(Xfer.peer, Xfer.tid)]
