"""The coordinator's storage for the transfer engine: data objects in, data objects out.

``DataSink`` is the engine's ``Sink`` for uploads of purpose kind ``data``
(docs/data.md): it admits an offer (the sender is a client or an admin, the owner is the
sender unless an admin names another, the quota has room, and content already held
completes at once under the new name: dedupe), keeps partial files under
``<data_dir>/partial/`` and the transfer records in the database (``xc_transfer``), and
takes a verified file by renaming it to ``<data_dir>/objects/ab/cd/<sha256>`` before the
database row that makes it visible is committed. Nothing half-received is ever visible:
a partial file has no row, and a row is written only after its bytes are in place.

``DataSource`` is the engine's ``Source``: a download names an object by ``sha256`` or by
``name`` (the requester's own, or ``owner``'s), and is served when the requester may read
it: its owner, a principal it is shared with, anyone for public data, any admin. Workers
fetch by hash only what the work they serve refers to, public or not
(``may_worker_read``: the stdin and inputs of their live job attempts, wired to
``Store.worker_may_read`` by the coordinator). Workers upload a job's results under
the job owner's name with the attempt as ``grant`` (``DataSink.attempt_grant``).

Every method runs on the bus's transfer lane. ``lock`` is shared with garbage collection
(coordinator/data_service.py), so an object is never deleted between a dedupe that found
it and the row that names it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.acl import Role
from broker.transfer import (
    Admission,
    Offer,
    SourceFile,
    TransferRecord,
    TransferRefused,
)
from broker.transfer.state import fsync_dir
from coordinator.errors import CoordinatorError
from coordinator.store import DataRecord, Store
from coordinator.store.data import valid_sha256

log = logging.getLogger(__name__)

RoleOf = Callable[[str], Role | None]
AttemptGrant = Callable[[str, str], tuple[str, str] | None]
"""(attempt id, worker id) -> (job id, owner) while the attempt is live on that worker
(``Store.attempt_grant``); None otherwise."""
RateOf = Callable[[str], float]
"""Takes a token of the principal's request bucket: 0 when granted, else the wait in s."""
NAME_MAX = 255


def human_bytes(n: float) -> str:
    """``1.5 GiB``: sizes in the words of quota messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class Quota:
    """Bytes a principal may store: ``client`` for clients, ``admin`` for admins (0: no
    limit for either)."""

    client: int
    admin: int = 0

    def limit(self, role: Role | None) -> int | None:
        value = self.admin if role is Role.ADMIN else self.client
        return value if value > 0 else None


@dataclass(frozen=True)
class Placement:
    """What an upload's purpose asks for: whose name, which name, which rights."""

    owner: str
    name: str
    access: str
    share: tuple[str, ...]
    expires_at: float | None
    owner_role: Role | None  # whose quota applies


class DataFiles:
    """Where the bytes live: ``objects/ab/cd/<sha256>`` and ``partial/<key>.part``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def object_path(self, sha256: str) -> Path:
        if not valid_sha256(sha256):
            raise ValueError("not a sha256")
        return self.objects / sha256[:2] / sha256[2:4] / sha256

    def partial_path(self, peer: str, tid: str) -> Path:
        return self.partial / f"{partial_key(peer, tid)}.part"

    def holds(self, sha256: str, size: int) -> bool:
        try:
            return self.object_path(sha256).stat().st_size == size
        except OSError:
            return False


USAGE_FRESH_S = 5.0  # an owner's stored bytes are read again after this (quota checks)
USAGE_OWNERS_MAX = 10_000  # owners whose usage is kept between reads


def partial_key(peer: str, tid: str) -> str:
    return hashlib.sha256(f"{peer}\0{tid}".encode()).hexdigest()[:32]


def limited(rate: RateOf | None, principal: str, what: str) -> None:
    """Refuse (``rate_limited``) when ``principal``'s request bucket is empty."""
    wait = rate(principal) if rate is not None else 0.0
    if wait > 0:
        raise TransferRefused("rate_limited", f"{principal} sends {what} too fast; retry "
                              f"in {wait:.2g}s")


def may_worker_read(wid: str, sha256: str) -> bool:
    """May worker ``wid`` fetch the object ``sha256``?

    The hook of issue 9, item 7: a worker may read only data that a job assigned to it,
    or the reservation it serves, refers to. This default refuses everything (even
    public data); the coordinator replaces it with ``Store.worker_may_read`` (the stdin
    and inputs of the attempts live on that worker; coordinator/service.py).
    """
    del wid, sha256
    return False


def no_attempt_grant(aid: str, wid: str) -> tuple[str, str] | None:
    """The default of ``DataSink.attempt_grant``: workers upload nothing (the coordinator
    wires ``Store.attempt_grant`` in, coordinator/service.py)."""
    del aid, wid
    return None


class DataSink:
    """The ``Sink`` of data uploads (see the module docstring)."""

    def __init__(self, store: Store, files: DataFiles, quota: Quota, role_of: RoleOf,
                 lock: threading.Lock | None = None,
                 clock: Callable[[], float] = time.time,
                 rate: RateOf | None = None) -> None:
        self.store = store
        self.files = files
        self.quota = quota
        self.role_of = role_of
        self.lock = lock or threading.Lock()
        self._clock = clock
        self.rate = rate
        # Batch jobs (docs/jobs.md): a worker uploads results for its live attempts.
        self.attempt_grant: AttemptGrant = no_attempt_grant
        # owner -> (when read, bytes stored): the sum reads every name of the owner, and
        # every new result of a sweep asks; what is stored meanwhile adds to it
        self._stored: dict[str, tuple[float, int]] = {}

    # -- admission ------------------------------------------------------------------------

    def admit(self, offer: Offer) -> Admission:
        role = self._role(offer.peer)
        limited(self.rate, offer.peer, "upload offers")
        place = self._placement(offer.peer, role, offer.name, offer.purpose)
        with self.lock:
            mine = self._holds(place.owner, offer.sha256)
            obj = self.store.data_object(offer.sha256)
            if obj is not None and obj.size == offer.size and self.files.holds(
                    offer.sha256, offer.size):
                if not mine:
                    self._check_quota(place, offer.size, offer.tid, place.name)
                entry = self._commit(place, offer.sha256, offer.size, new=not mine)
                log.info("data %s from %s held already (%s): named %r", offer.sha256[:12],
                         offer.peer, place.owner, place.name)
                return Admission(ref=_ref(entry))
            if not mine:
                self._check_quota(place, offer.size, offer.tid, place.name)
        return Admission()

    def _role(self, peer: str) -> Role | None:
        role = self.role_of(peer)
        if role is Role.WORKER:
            return role  # admitted by its attempt's grant (_worker_placement)
        if role not in (Role.CLIENT, Role.ADMIN):
            raise TransferRefused("forbidden", f"{peer} may not upload data: only clients "
                                  "and admins store data objects")
        return role

    def _placement(self, peer: str, role: Role | None, name: str,
                   purpose: dict[str, Any],
                   grant: tuple[str, str] | None = None) -> Placement:
        if purpose.get("kind") != "data":
            raise TransferRefused("unsupported", "the coordinator stores data objects only "
                                  f"(purpose kind data, not {purpose.get('kind')!r})")
        owner = str(purpose.get("owner") or peer)
        if role is Role.WORKER:
            self._worker_grant(peer, owner, purpose, grant)
        elif owner != peer and role is not Role.ADMIN:
            raise TransferRefused("forbidden", f"{peer} may store data under its own name "
                                  f"only, not {owner}'s")
        name = str(purpose.get("name") or name)
        if not name or len(name) > NAME_MAX or any(ord(c) < 32 for c in name):
            raise TransferRefused("invalid", "a data name is 1-255 printable characters")
        share = tuple(str(p) for p in purpose.get("share") or ())
        access = str(purpose.get("access") or ("shared" if share else "private"))
        if share and access != "shared":
            raise TransferRefused("invalid", f"access {access} takes no share list")
        expires = purpose.get("expires_s")
        expires_at = None if expires is None else self._clock() + float(expires)
        owner_role = role if owner == peer else (self.role_of(owner) or Role.CLIENT)
        return Placement(owner, name, access, share, expires_at, owner_role)

    def _worker_grant(self, wid: str, owner: str, purpose: dict[str, Any],
                      known: tuple[str, str] | None = None) -> None:
        """A worker stores a job's results: ``grant`` names an attempt live on it whose
        job's owner is ``owner``, and the name is ``<job id>/stdout``, ``/stderr`` or
        ``/outputs/<name>`` (the owner's quota applies)."""
        aid = purpose.get("grant")
        grant = known or (self.attempt_grant(str(aid), wid) if isinstance(aid, str) and aid
                          else None)
        if grant is None or grant[1] != owner:
            raise TransferRefused("forbidden", f"{wid} may store data only for an attempt "
                                  "it runs now, under that job's owner")
        name = str(purpose.get("name") or "")
        job = grant[0]
        if name not in (f"{job}/stdout", f"{job}/stderr") and not name.startswith(
                f"{job}/outputs/"):
            raise TransferRefused("forbidden", f"a worker names job results {job}/stdout, "
                                  f"{job}/stderr or {job}/outputs/NAME, not {name!r}")

    def _holds(self, owner: str, sha256: str) -> bool:
        return self.store.holds_data(owner, sha256)

    def _check_quota(self, place: Placement, size: int, tid: str, name: str) -> None:
        limit = self.quota.limit(place.owner_role)
        if limit is None:
            return
        stored = self._stored_bytes(place.owner)
        reserved = self.store.data_reserved(place.owner, exclude_tid=tid)
        if stored + reserved + size > limit:
            pending = f" (+ {human_bytes(reserved)} in unfinished uploads)" if reserved else ""
            raise TransferRefused(
                "quota_exceeded",
                f"quota exceeded: {place.owner} stores {human_bytes(stored)}{pending} of "
                f"{human_bytes(limit)}, and {name} needs {human_bytes(size)} more; remove "
                "data (`xcloud data rm`) or ask an admin for more room")

    def _stored_bytes(self, owner: str) -> int:
        """``owner``'s stored bytes, read again at most every USAGE_FRESH_S (under
        ``self.lock``): removals free quota that much later, stores count at once."""
        now = time.monotonic()
        known = self._stored.get(owner)
        if known is not None and now - known[0] < USAGE_FRESH_S:
            return known[1]
        if len(self._stored) >= USAGE_OWNERS_MAX:
            self._stored.clear()
        stored = self.store.data_stored(owner)
        self._stored[owner] = (now, stored)
        return stored

    def _commit(self, place: Placement, sha256: str, size: int, *,
                new: bool = False) -> DataRecord:
        """Name the content; ``new``: the owner held none of it (its usage grows)."""
        try:
            entry = self.store.put_data(place.owner, place.name, sha256, size,
                                        access=place.access, share=place.share,
                                        expires_at=place.expires_at)
        except CoordinatorError as err:
            raise TransferRefused(getattr(err, "code", "internal"), str(err)) from err
        known = self._stored.get(place.owner)
        if new and known is not None:
            self._stored[place.owner] = (known[0], known[1] + size)
        return entry

    # -- records ----------------------------------------------------------------------------

    def partial_path(self, record: TransferRecord) -> Path:
        return self.files.partial_path(record.peer, record.tid)

    def save_state(self, record: TransferRecord) -> None:
        self.store.save_transfer(record.to_json())

    def save_progress(self, record: TransferRecord) -> None:
        self.store.save_transfer_have(record.peer, record.tid, record.have, time.time())

    def load_states(self) -> Iterable[TransferRecord]:
        records = []
        for fields in self.store.load_transfers():
            try:
                records.append(TransferRecord.from_json(fields))
            except (ValueError, KeyError, TypeError) as err:
                log.warning("dropping unreadable transfer record %s/%s: %s",
                            fields.get("peer"), fields.get("tid"), err)
                self.store.drop_transfer(str(fields.get("peer")), str(fields.get("tid")))
        return records

    def drop_state(self, record: TransferRecord) -> None:
        self.store.drop_transfer(record.peer, record.tid)

    # -- the end --------------------------------------------------------------------------

    def complete(self, record: TransferRecord, partial: Path) -> dict[str, Any]:
        role = self.role_of(record.peer)
        place = self._placement(record.peer, role, record.name, record.purpose)
        with self.lock:
            mine = self._holds(place.owner, record.sha256)
            if not mine:
                self._check_quota(place, record.size, record.tid, place.name)
            dest = self.files.object_path(record.sha256)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if self.files.holds(record.sha256, record.size):
                partial.unlink(missing_ok=True)  # the same content arrived meanwhile
            else:
                os.replace(partial, dest)
                fsync_dir(dest.parent)
            entry = self._commit(place, record.sha256, record.size, new=not mine)
        log.info("stored data %s (%s) for %s as %r", record.sha256[:12],
                 human_bytes(record.size), place.owner, place.name)
        return _ref(entry)

    def put_small(self, peer: str, purpose: dict[str, Any], data: bytes, *,
                  grant: tuple[str, str] | None = None) -> dict[str, Any]:
        """Store ``data`` as an upload with ``purpose`` would have (the same checks: the
        peer's role, a worker's attempt grant and result name, the owner's quota), without
        a transfer: a small result carried in its attempt's report (docs/jobs.md).
        ``grant``: the (job, owner) ``attempt_grant`` gave for ``purpose``'s attempt on
        ``peer`` while handling this report (one lookup for all its results)."""
        role = self._role(peer)
        place = self._placement(peer, role, str(purpose.get("name") or ""), purpose, grant)
        digest = hashlib.sha256(data).hexdigest()
        with self.lock:
            mine = self._holds(place.owner, digest)
            if not mine:
                self._check_quota(place, len(data), "", place.name)
            if not self.files.holds(digest, len(data)):
                dest = self.files.object_path(digest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = self.files.partial / f"small-{os.getpid()}-{threading.get_ident()}.part"
                with open(part, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(part, dest)
                fsync_dir(dest.parent)
            entry = self._commit(place, digest, len(data), new=not mine)
        return _ref(entry)


def _ref(entry: DataRecord) -> dict[str, Any]:
    """xfer.init.json#/definitions/data_ref"""
    return {"sha256": entry.sha256, "size": entry.size, "name": entry.name,
            "owner": entry.owner, "id": entry.id}


class DataSource:
    """The ``Source`` of data downloads (see the module docstring)."""

    def __init__(self, store: Store, files: DataFiles, role_of: RoleOf,
                 worker_may_read: Callable[[str, str], bool] = may_worker_read,
                 rate: RateOf | None = None) -> None:
        self.store = store
        self.files = files
        self.role_of = role_of
        self.worker_may_read = worker_may_read
        self.rate = rate

    def open_fetch(self, requester: str, source: dict[str, Any]) -> SourceFile:
        if source.get("kind") != "data":
            raise TransferRefused("unsupported", "the coordinator serves data objects only "
                                  f"(source kind data, not {source.get('kind')!r})")
        role = self.role_of(requester)
        if role is None:
            raise TransferRefused("forbidden", f"{requester} is unknown or revoked")
        limited(self.rate, requester, "download requests")
        entry = self.resolve(requester, role, source)
        path = self.files.object_path(entry.sha256)
        if not self.files.holds(entry.sha256, entry.size):
            log.error("data object %s is in the database but not on disk (%s)",
                      entry.sha256, path)
            raise TransferRefused("not_found", f"the bytes of {entry.name} are missing on "
                                  "the coordinator; an admin should look at its data dir")
        self.store.touch_data(entry.sha256)
        return SourceFile(path=path, size=entry.size, sha256=entry.sha256, name=entry.name)

    def resolve(self, requester: str, role: Role, source: dict[str, Any]) -> DataRecord:
        """The entry ``source`` names that ``requester`` may read, or a refusal."""
        if role is Role.WORKER:
            return self._for_worker(requester, source)
        sha = source.get("sha256")
        if sha:
            readable = self.store.readable_data_entry(str(sha), requester)
            if readable is not None:
                return readable
            first = self.store.first_data_entry(str(sha))
            if first is None:
                raise TransferRefused("not_found", f"no data object {str(sha)[:12]}…")
            if role is Role.ADMIN:
                return first
            raise TransferRefused("forbidden", f"data {str(sha)[:12]}… is not shared "
                                  f"with {requester}")
        name = source.get("name")
        if not name:
            raise TransferRefused("invalid", "name a data object by sha256 or by name")
        owner = str(source.get("owner") or requester)
        found = [e for e in self.store.find_data(owner, str(name)) if e.name == name]
        if not found:
            whose = "you have" if owner == requester else f"{owner} has"
            raise TransferRefused("not_found", f"{whose} no data named {name!r}")
        entry = found[0]
        if entry.readable_by(requester) or role is Role.ADMIN:
            return entry
        raise TransferRefused("forbidden", f"{owner}'s {name!r} is not shared with "
                              f"{requester}")

    def _for_worker(self, wid: str, source: dict[str, Any]) -> DataRecord:
        """Workers fetch by hash, and only what their work refers to (even public data:
        a worker runs others' work, not its owner's wishes)."""
        sha = str(source.get("sha256") or "")
        if not sha or not self.worker_may_read(wid, sha):
            raise TransferRefused("forbidden", f"worker {wid} may fetch only data that "
                                  "the work it serves refers to")
        entry = self.store.first_data_entry(sha)
        if entry is not None:
            return entry
        # Kept by a reference only (an app's binary whose name was removed or reused):
        # the work refers to the bytes, which is what a worker may fetch.
        obj = self.store.data_object(sha)
        if obj is None:
            raise TransferRefused("not_found", f"no data object {sha[:12]}…")
        return DataRecord(id="", owner="", name=sha, sha256=sha, size=obj.size,
                          access="private", share=(), created_at=obj.created_at,
                          last_used_at=obj.last_used_at, expires_at=None)
