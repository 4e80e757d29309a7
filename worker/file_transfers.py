"""Files on a reservation: the worker's ``Sink`` and ``Source`` for transfers of kind
``workdir`` (``put`` / ``get`` / ``xcloud cp``; docs/transfer.md "Files on a
reservation").

A client sends a file into, or fetches one out of, the work directory of a reservation
it holds on this worker. Every offer (``xfer.init``) and every fetch (``xfer.fetch``)
carries the reservation's grant in its purpose (``{"kind": "workdir", "grant": ..,
"path": .., "tar": .., "mode": ..}``), checked as the exec service checks ``exec.*``
(worker/exec_auth.py): signed by the coordinator, for this worker and the *sending*
principal, and naming a session open here and held by that principal. An offer needs an
unexpired grant; a fetch of a session still open and held by the requester is served
under a grant that expired meanwhile (a long download outlives the lease it began in).

Paths are relative to the work directory (with the docker executor ``/work/...`` is
accepted too, as the container sees it). ``..`` is refused, an absolute path outside
the work directory too, and the path is resolved and must stay inside: a symbolic link
may point within the work directory, never out of it. The directories are then opened
one component at a time without following links (``O_NOFOLLOW``, ``dir_fd``), so a
command that swaps a directory for a link between the check and the use gets an error,
not another file. Directories travel as an uncompressed tar (``tar: true``): unpacked
with tarfile's ``data`` filter (no absolute or ``..`` members, no links out, no device
files) into a private staging directory, then moved into place; packed to a temporary
file first, by a walk that never follows a link, and streamed from there. The path
rules live in ``workdir_access.py``, the tree walks in ``workdir_trees.py``.

Bookkeeping lives beside the work dir, in ``sessions/<rid>/xfer/`` (records, partial
files, staging, download snapshots): the container does not see it, and the session's
removal at release takes it along. With the docker executor the work directory is
bind-mounted at ``/work``, so writing the host side is all it takes; files are handed
to the container's user the way the driver prepared the directory (``chown``: owned by
its uid; ``open``: writable by all).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, cast

from broker.transfer import (
    Admission,
    JsonStateStore,
    Offer,
    SourceFile,
    TransferRecord,
    TransferRefused,
    file_sha256,
)
from schemas.grants import GrantClaims, GrantError, verify_grant
from worker.exec_auth import CoordinatorKey
from worker.exec_sessions import Session
from worker.request_guard import WorkerRequestGuard
from worker.sessions import SessionStore, remove_tree
from worker.workdir_access import (
    OPEN_FILE,
    Handover,
    open_dirs,
    place_file,
    refuse,
    relative_path,
    resolve_inside,
)
from worker.workdir_trees import copy_fd, merge_into, pack_dir

log = logging.getLogger(__name__)

KIND = "workdir"
XFER_DIR = "xfer"  # sessions/<rid>/xfer: records, partials, staging, snapshots
DIRECTORY_REFUSAL = "is a directory"  # a fetch without tar of a directory (the client retries)
FREE_MARGIN = 64 << 20  # bytes of the work dir's file system an upload leaves free
SNAPSHOT_TTL_S = 3600.0  # download snapshots older than this go (they are re-made on demand)
MAX_HASH_CACHE = 256

F = TypeVar("F", bound=Callable[..., Any])


def os_errors_refused(method: F) -> F:
    """A file-system error of a storage method reaches the peer as a refusal in words,
    not as a failed handler."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError as err:
            log.warning("%s failed: %s", method.__name__, err)
            raise refuse("internal", f"the worker's file system said: {err.strerror or err}"
                          ) from None

    return cast(F, run)


class WorkdirFiles:
    """The worker's sink and source for ``workdir`` transfers (see the module docstring).

    ``find_session`` looks an open session up by reservation id (the exec service's
    table); ``guard`` (the worker's request guard) rate-limits what costs work: offers,
    and fetches that must hash or pack.
    """

    def __init__(self, wid: str, key: CoordinatorKey,
                 find_session: Callable[[str], Session | None], store: SessionStore, *,
                 guard: WorkerRequestGuard | None = None, durable: bool = True) -> None:
        self.wid = wid
        self.key = key
        self.find_session = find_session
        self.store = store
        self.guard = guard
        self.durable = durable
        self._lock = threading.Lock()
        self._rids: dict[tuple[str, str], str] = {}  # (peer, tid) -> reservation
        self._hashes: dict[tuple[int, int, int, int], str] = {}  # (dev, ino, size, mtime)

    # -- authorization ------------------------------------------------------------------

    def _claims(self, peer: str, grant: Any, *, check_expiry: bool) -> GrantClaims:
        key = self.key.key
        if key is None:
            raise refuse("forbidden", f"worker {self.wid} does not know the coordinator's "
                          "key yet")
        if not isinstance(grant, str):
            raise refuse("forbidden", "a work-directory transfer needs the reservation's "
                          "grant")
        try:
            return verify_grant(key, grant, client=peer, worker=self.wid,
                                now=None if check_expiry else 0.0)
        except GrantError as err:
            raise refuse("forbidden", f"grant refused: {err}") from None

    def authorize(self, peer: str, purpose: dict[str, Any], *,
                  check_expiry: bool = True) -> Session:
        """The open session ``purpose``'s grant gives ``peer``; else TransferRefused."""
        if purpose.get("kind") != KIND:
            raise refuse("unsupported", f"worker {self.wid} takes only transfers of kind "
                          f"{KIND!r} (files of a reservation)")
        claims = self._claims(peer, purpose.get("grant"), check_expiry=check_expiry)
        session = self.find_session(claims.rid)
        if session is None or session.closing:
            raise refuse("forbidden", f"reservation {claims.rid} is not open on worker "
                          f"{self.wid}")
        if session.record.client != peer:
            raise refuse("forbidden", f"reservation {claims.rid} is not held by {peer}")
        return session

    def _rate(self, peer: str, what: str) -> None:
        if self.guard is None:
            return
        wait = self.guard.buckets.take(peer)
        if wait > 0:
            raise refuse("rate_limited", f"{peer} asks too fast: {what} refused, retry in "
                          f"{wait:.2g}s")

    def _rid_of(self, record: TransferRecord) -> str:
        with self._lock:
            rid = self._rids.get(record.key)
        if rid is None:  # after a restart: the grant says (it was checked at admission)
            rid = self._claims(record.peer, record.purpose.get("grant"),
                               check_expiry=False).rid
            with self._lock:
                self._rids[record.key] = rid
        return rid

    def xfer_dir(self, rid: str) -> Path:
        return self.store.path(rid) / XFER_DIR

    def _states(self, rid: str) -> JsonStateStore:
        return JsonStateStore(self.xfer_dir(rid) / "states", durable=self.durable)

    # -- Sink -------------------------------------------------------------------------

    @os_errors_refused
    def admit(self, offer: Offer) -> Admission:
        self._rate(offer.peer, "the upload")
        session = self.authorize(offer.peer, offer.purpose)
        workdir = Path(session.handle.workdir)
        shown = str(offer.purpose.get("path") or offer.name)
        rel = relative_path(shown, workdir, Handover.of(session).mount)
        resolve_inside(workdir, rel, shown)
        need = offer.size * (2 if offer.purpose.get("tar") else 1) + FREE_MARGIN
        free = shutil.disk_usage(workdir).free
        if need > free:
            raise refuse("too_large", f"{offer.size} bytes do not fit on worker {self.wid}: "
                          f"{free} bytes free in the work directory's file system")
        with self._lock:
            self._rids[(offer.peer, offer.tid)] = session.rid
        self.xfer_dir(session.rid).mkdir(mode=0o700, parents=True, exist_ok=True)
        return Admission()

    def partial_path(self, record: TransferRecord) -> Path:
        digest = hashlib.sha256(f"{record.peer}\0{record.tid}".encode()).hexdigest()[:32]
        return self.xfer_dir(self._rid_of(record)) / f"{digest}.part"

    def _live_states(self, record: TransferRecord) -> JsonStateStore | None:
        """The record store of ``record``'s session; None once the session is gone (its
        directory went at release: nothing is written that would bring it back)."""
        rid = self._rid_of(record)
        if not self.store.path(rid).is_dir():
            log.info("transfer %s of %s: reservation %s is gone", record.tid, record.peer, rid)
            return None
        return self._states(rid)

    def save_state(self, record: TransferRecord) -> None:
        states = self._live_states(record)
        if states is not None:
            states.save(record)

    def save_progress(self, record: TransferRecord) -> None:
        states = self._live_states(record)
        if states is not None:
            states.save_have(record)

    def load_states(self) -> Iterable[TransferRecord]:
        records: list[TransferRecord] = []
        if not self.store.root.is_dir():
            return records
        for states in sorted(self.store.root.glob(f"*/{XFER_DIR}/states")):
            records.extend(JsonStateStore(states, durable=self.durable))
        return records

    def drop_state(self, record: TransferRecord) -> None:
        with contextlib.suppress(TransferRefused, OSError):
            self._states(self._rid_of(record)).delete(record)
        with self._lock:
            self._rids.pop(record.key, None)

    @os_errors_refused
    def complete(self, record: TransferRecord, partial: Path) -> dict[str, Any]:
        rid = self._rid_of(record)
        session = self.find_session(rid)
        if session is None or session.closing or session.record.client != record.peer:
            raise refuse("not_found", f"reservation {rid} ended before the file was in")
        handover = Handover.of(session)
        workdir = Path(session.handle.workdir)
        shown = str(record.purpose.get("path") or record.name)
        parts = resolve_inside(workdir, relative_path(shown, workdir, handover.mount),
                               shown)
        if record.purpose.get("tar"):
            self._complete_tree(record, partial, workdir, parts, handover, shown)
        else:
            parts = self._file_target(workdir, parts, record.name, shown)
            self._complete_file(record, partial, workdir, parts, handover, shown)
        where = "/".join(parts) or "."
        log.info("%s put %s (%d bytes) into reservation %s", record.peer, where,
                 record.size, rid)
        return {"sha256": record.sha256, "size": record.size,
                "name": (parts[-1] if parts else ".")[:255], "path": where[:4096]}

    @staticmethod
    def _file_target(workdir: Path, parts: list[str], name: str, shown: str) -> list[str]:
        """Into an existing directory a file keeps its own name (as ``cp`` does)."""
        target = os.path.join(os.path.realpath(workdir), *parts)
        if os.path.isdir(target):
            base = PurePosixPath(name).name
            if not base or base in (".", ".."):
                raise refuse("invalid", f"{shown} is a directory; name the file")
            return [*parts, base]
        if not parts:
            raise refuse("invalid", "the work directory itself is not a file name")
        return parts

    def _complete_file(self, record: TransferRecord, partial: Path, workdir: Path,
                       parts: list[str], handover: Handover, shown: str) -> None:
        mode = record.purpose.get("mode")
        place_file(partial, workdir, parts,
                   mode=(int(mode) if isinstance(mode, int) else 0o644) & 0o1777,
                   handover=handover, shown=shown, durable=self.durable)

    def _complete_tree(self, record: TransferRecord, partial: Path, workdir: Path,
                       parts: list[str], handover: Handover, shown: str) -> None:
        staging = self.xfer_dir(self._rid_of(record)) / f"unpack-{record.tid}"
        remove_tree(staging)
        staging.mkdir(mode=0o700)
        try:
            try:
                with tarfile.open(partial, "r:") as tar:
                    tar.extractall(staging, filter="data")
            except (tarfile.TarError, OSError) as err:
                raise refuse("invalid", f"{shown}: the directory archive cannot be unpacked "
                              f"safely: {err}") from None
            handover.apply_tree(staging)
            fd = open_dirs(workdir, parts, create=True, handover=handover, shown=shown)
            try:
                merge_into(staging, fd, shown)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            remove_tree(staging)
            partial.unlink(missing_ok=True)

    # -- Source -----------------------------------------------------------------------

    @os_errors_refused
    def open_fetch(self, requester: str, source: dict[str, Any]) -> SourceFile:
        session = self.authorize(requester, source, check_expiry=False)
        handover = Handover.of(session)
        workdir = Path(session.handle.workdir)
        shown = str(source.get("path") or ".")
        parts = resolve_inside(workdir, relative_path(shown, workdir, handover.mount),
                               shown)
        out = self.xfer_dir(session.rid) / "out"
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._prune(out)
        dfd = open_dirs(workdir, parts[:-1], create=False, handover=handover, shown=shown)
        try:
            name = parts[-1] if parts else "."
            try:
                fd = os.open(name, OPEN_FILE, dir_fd=dfd)
            except FileNotFoundError:
                raise refuse("not_found", f"{shown}: no such file in the work directory") \
                    from None
            except OSError as err:
                raise refuse("forbidden", f"{shown}: cannot be read ({err.strerror})") \
                    from None
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    if not source.get("tar"):
                        raise refuse("conflict", f"{shown} {DIRECTORY_REFUSAL}; fetch it "
                                      "as a tar")
                    return self._pack(requester, source, fd, out, shown)
                if not stat.S_ISREG(st.st_mode):
                    raise refuse("forbidden", f"{shown} is not a regular file")
                return self._snapshot(requester, fd, dfd, name, st, out)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def _snapshot(self, requester: str, fd: int, dfd: int, name: str, st: os.stat_result,
                  out: Path) -> SourceFile:
        """A hard link (else a copy) of the open file in our own directory: the engine
        opens it by path later, and a path in the work dir could be a link by then."""
        key = hashlib.sha256(f"{requester}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                             f"{st.st_mtime_ns}".encode()).hexdigest()[:32]
        snap = out / f"{key}.file"
        try:
            held = os.lstat(snap)
            fresh = (held.st_ino == st.st_ino and held.st_size == st.st_size
                     and stat.S_ISREG(held.st_mode))
        except FileNotFoundError:
            fresh = False
        if not fresh:
            snap.unlink(missing_ok=True)
            try:
                os.link(name, snap, src_dir_fd=dfd, follow_symlinks=False)
                held = os.lstat(snap)
                if not stat.S_ISREG(held.st_mode) or held.st_ino != st.st_ino:
                    snap.unlink(missing_ok=True)
                    raise refuse("conflict", f"{name} changed while it was opened")
            except OSError:
                copy_fd(fd, snap)
        size = os.stat(snap).st_size
        return SourceFile(snap, size, self._sha256(snap, requester), name)

    def _sha256(self, path: Path, requester: str) -> str:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            digest = self._hashes.get(key)
        if digest is None:
            self._rate(requester, "the download")
            digest = file_sha256(path)
            with self._lock:
                if len(self._hashes) >= MAX_HASH_CACHE:
                    self._hashes.clear()
                self._hashes[key] = digest
        return digest

    def _pack(self, requester: str, source: dict[str, Any], fd: int, out: Path,
              shown: str) -> SourceFile:
        """The directory as an uncompressed tar, packed once per download (the client's
        ``name`` in the source tells downloads apart)."""
        key = hashlib.sha256(f"{requester}\0{shown}\0{source.get('name') or ''}".encode()
                             ).hexdigest()[:32]
        packed = out / f"{key}.tar"
        if not packed.exists():
            self._rate(requester, "packing the directory")
            tmp = out / f".{key}.tar.tmp"
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                pack_dir(tar, fd, "")
            os.replace(tmp, packed)
        base = PurePosixPath(shown).name or "workdir"
        return SourceFile(packed, packed.stat().st_size, self._sha256(packed, requester),
                          f"{base}.tar")

    @staticmethod
    def _prune(out: Path) -> None:
        cutoff = time.time() - SNAPSHOT_TTL_S
        with contextlib.suppress(OSError):
            for entry in os.scandir(out):
                with contextlib.suppress(OSError):
                    # ctime: a hard link's mtime is its file's; link() sets the ctime
                    if entry.stat(follow_symlinks=False).st_ctime < cutoff:
                        os.unlink(entry.path)

