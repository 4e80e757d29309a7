"""A data object of the coordinator's store placed in a reservation's work directory
(``workdir.fetch``; docs/data.md, "On a reserved worker"; issue 9 items 4 and 7).

The holder names the object by hash; the worker takes its bytes through the input cache
(worker/input_cache.py) that jobs use too, so an object the worker holds already is not
fetched again, and fetched bytes are verified before they are kept. The coordinator
serves the worker only what the reservation's holder may read
(``Store.worker_may_read``), so the worker does not need to trust the request's claim;
before every placement, a hit of the cache too (the cache may hold another principal's
object, fetched for a job), the worker asks the coordinator to describe the object
(``xfer.fetch`` without ranges: its rights check, no bytes move).

Authorized exactly as put/get (worker/file_transfers.py ``WorkdirFiles.authorize``): the
grant must verify, name this worker and the sender, and belong to a session open here
and held by the sender; the request guard has taken the sender's token before. The quick
checks (grant, path) run on the transfer lane; fetching and copying run on a small pool
of their own (a fetch waits for segments that arrive on the transfer lane), with a
bounded queue (``busy`` beyond it). The file is copied out of the cache (a job or a
command that rewrites it in place must not corrupt the cache) into the session's
``xfer`` directory, handed to the container's user, then moved into place through
directories opened without following links (worker/workdir_access.py), as ``put`` does.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker.bus import Bus, Incoming, Lane, RemoteError, RequestTimeout
from broker.transfer import Peer, TransferError, TransferRefused
from broker.transfer.segments import new_tid
from schemas.messages import Ok
from schemas.transfer_messages import WorkdirFetch, XferFetch, XferInit
from worker.exec_sessions import Session
from worker.file_transfers import FREE_MARGIN, KIND, WorkdirFiles
from worker.input_cache import CacheError, FetchNotice, InputCache
from worker.request_guard import WorkerRequestGuard
from worker.workdir_access import Handover, place_file, refuse, relative_path, resolve_inside

log = logging.getLogger(__name__)

LANE = Lane.TRANSFER  # the quick checks; the slow work runs on the pool
POOL_THREADS = 2  # fetches and copies at once
MAX_PENDING = 16  # running and queued; more is refused as busy
DEFAULT_MODE = 0o644
CAPS_S = 10.0  # caps (with the cache's summary) republished at most this often
CHECK_TIMEOUT_S = 15.0  # the coordinator's answer to the rights check


def cache_refusal(err: CacheError) -> TransferRefused:
    """The refusal behind a cache failure: the coordinator's code when it refused (the
    holder may not read the object, it is gone), else ``unavailable``."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, TransferError):
            code = cause.code if cause.code in ("forbidden", "not_found", "too_large",
                                                "conflict") else "unavailable"
            return refuse(code, f"the data object cannot be fetched: {cause}")
        cause = cause.__cause__
    text = str(err)
    code = "forbidden" if "forbidden" in text or "may fetch only" in text else "unavailable"
    return refuse(code, f"the data object cannot be fetched: {text}")


class WorkdirDataFetch:
    """Serves ``workdir.fetch`` on one worker (see the module docstring)."""

    def __init__(self, bus: Bus, files: WorkdirFiles, cache: InputCache, coordinator: Peer,
                 *, caps_changed: Callable[[], None] | None = None, durable: bool = True,
                 threads: int = POOL_THREADS, max_pending: int = MAX_PENDING) -> None:
        self.bus = bus
        self.files = files
        self.cache = cache
        self.coordinator = coordinator
        self.durable = durable
        self.max_pending = max_pending
        self.notice = FetchNotice(cache, caps_changed, CAPS_S)
        self._pool = ThreadPoolExecutor(max_workers=threads,
                                        thread_name_prefix="workdir-fetch")
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False

    def register(self, guard: WorkerRequestGuard) -> None:
        """Before ``bus.start()``: the handler, behind the worker's request guard."""
        self.bus.on_inbox(WorkdirFetch.TYPE, guard.wrap(self.on_fetch), lane=LANE)

    def close(self) -> None:
        """Refuse new requests, finish the ones running (queued ones are dropped)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- on the lane: quick checks --------------------------------------------------------

    def on_fetch(self, incoming: Incoming) -> None:
        body: WorkdirFetch = incoming.body
        peer = incoming.sender or ""
        try:
            session = self._session(peer, body)
            self._target(session, body)  # a bad path is refused before any fetch
            with self._lock:
                if self._closed:
                    raise refuse("unavailable", "the worker is stopping")
                if self._pending >= self.max_pending:
                    raise refuse("busy", f"{self._pending} data placements are under way "
                                 "on this worker; retry later")
                self._pending += 1
        except TransferRefused as err:
            self.bus.reply_error(incoming, err.code, str(err))
            return
        try:
            self._pool.submit(self._serve, incoming, peer, body)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._pending -= 1
            self.bus.reply_error(incoming, "unavailable", "the worker is stopping")

    def _session(self, peer: str, body: WorkdirFetch) -> Session:
        session = self.files.authorize(peer, {"kind": KIND, "grant": body.grant})
        if session.rid != body.reservation:
            raise refuse("forbidden", f"the grant is for reservation {session.rid}, not "
                         f"{body.reservation}")
        return session

    @staticmethod
    def _target(session: Session, body: WorkdirFetch) -> list[str]:
        """The components of the destination inside the work directory (as put's)."""
        handover = Handover.of(session)
        workdir = Path(session.handle.workdir)
        parts = resolve_inside(workdir, relative_path(body.path, workdir, handover.mount),
                               body.path)
        return WorkdirFiles._file_target(workdir, parts, body.name or body.sha256,
                                         body.path)

    # -- on the pool: fetch and place -----------------------------------------------------

    def _serve(self, incoming: Incoming, peer: str, body: WorkdirFetch) -> None:
        try:
            detail = self._fetch_and_place(peer, body)
        except TransferRefused as err:
            log.info("workdir.fetch of %s… for %s refused: %s", body.sha256[:12], peer, err)
            self.bus.reply_error(incoming, err.code, str(err))
        except Exception as err:
            log.exception("workdir.fetch of %s… for %s failed", body.sha256[:12], peer)
            self.bus.reply_error(incoming, "internal", f"placing the data object failed: "
                                 f"{err}"[:4000])
        else:
            self.bus.reply(incoming, Ok(detail=detail))
        finally:
            with self._lock:
                self._pending -= 1
        self.notice.check()

    def _may_read(self, sha256: str) -> None:
        """The coordinator's rights check for this worker (now: its reservation's holder),
        as a description of the object; refused in the coordinator's words."""
        try:
            reply = self.bus.request(self.coordinator.inbox, XferFetch(
                tid=new_tid(), source={"kind": "data", "sha256": sha256}),
                timeout=CHECK_TIMEOUT_S).body
        except RemoteError as err:
            raise refuse(err.code, f"the coordinator refused the data object: "
                         f"{err.error.message}") from None
        except RequestTimeout:
            raise refuse("unavailable", "the coordinator did not answer") from None
        if not isinstance(reply, XferInit) or reply.sha256 != sha256:
            raise refuse("unavailable", "the coordinator described another object")

    def _fetch_and_place(self, peer: str, body: WorkdirFetch) -> dict[str, Any]:
        self._may_read(body.sha256)
        held = self.cache.holds(body.sha256)
        try:
            source = self.cache.get(body.sha256, hold=True)
        except CacheError as err:
            raise cache_refusal(err) from None
        try:
            # The grant is checked again: the reservation may have ended meanwhile.
            session = self._session(peer, body)
            parts = self._target(session, body)
            size = self._place(session, source, parts, body)
        finally:
            self.cache.release(body.sha256)
        where = "/".join(parts)
        log.info("%s placed data %s… (%d bytes) at %s in reservation %s", peer,
                 body.sha256[:12], size, where, body.reservation)
        return {"sha256": body.sha256, "size": size, "path": where[:1024], "cached": held}

    def _place(self, session: Session, source: Path, parts: list[str],
               body: WorkdirFetch) -> int:
        handover = Handover.of(session)
        workdir = Path(session.handle.workdir)
        shown = body.path
        try:
            size = source.stat().st_size
            free = shutil.disk_usage(workdir).free
            if size + FREE_MARGIN > free:
                raise refuse("too_large", f"{size} bytes do not fit in the work directory: "
                             f"{free} bytes free there")
            staging = self.files.xfer_dir(session.rid)
            staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = staging / f"data-{uuid.uuid4().hex[:16]}.part"
            try:
                shutil.copyfile(source, partial)
                mode = body.mode if body.mode is not None else DEFAULT_MODE
                place_file(partial, workdir, parts, mode=mode & 0o777, handover=handover,
                           shown=shown, durable=self.durable)
            finally:
                partial.unlink(missing_ok=True)
        except OSError as err:
            log.warning("placing %s… failed: %s", body.sha256[:12], err)
            raise refuse("internal", f"the worker's file system said: "
                         f"{err.strerror or err}") from None
        return size
