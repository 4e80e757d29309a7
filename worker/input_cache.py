"""The worker's input cache: data objects fetched by SHA-256, shared by every job.

Jobs name their inputs (and stdin) by content hash. ``InputCache.get(sha256)`` returns a
local file holding exactly those bytes: from the cache when it holds them (a *hit*),
otherwise fetched once from the coordinator by the ``fetch`` callable (the transfer
engine, which verifies the size and hash before the file appears) and kept. Concurrent
requests for one hash wait for the one fetch in flight. Files live under
``<state_dir>/cache/objects/<2 hex>/<sha256>``; their modification time is their last
use, so the least-recently-used order survives a worker restart. When the cache holds
more than ``cap_bytes`` the least recently used files go, never one that a job is using
(``hold``/``release``; a job copies its inputs while holding them, after which eviction
cannot harm it), nor the most recently used one.

``summary(n)`` lists the most recently used hashes: the worker advertises them in its
caps (``shared.data`` as ``sha256:<hex>``) so a scheduler can prefer a worker that
already holds a job's inputs (issue 9, item 4).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from worker.errors import WorkerError

log = logging.getLogger(__name__)

DIR = "cache"
SUMMARY_MAX = 256
HEX = frozenset("0123456789abcdef")

#: fetch(sha256, dest): put the verified bytes of ``sha256`` at ``dest`` (raise otherwise).
Fetch = Callable[[str, Path], None]


class CacheError(WorkerError):
    """An input could not be fetched into the cache."""

    code = "input_failed"


def valid_sha256(text: str) -> bool:
    return len(text) == 64 and set(text) <= HEX


class InputCache:
    """Content-addressed files with a size cap and LRU eviction (module docstring)."""

    def __init__(self, root: Path | str, cap_bytes: int, fetch: Fetch | None = None) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.incoming = self.root / "incoming"
        self.cap_bytes = max(0, int(cap_bytes))
        self.fetch = fetch
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, oldest first
        self._held: dict[str, int] = {}  # sha256 -> jobs using it
        self._inflight: dict[str, threading.Event] = {}
        self._errors: dict[str, str] = {}  # the failure of the last fetch, for its waiters
        self.hits = 0
        self.fetches = 0
        self.evictions = 0
        self._last_stamp = 0
        self._load()

    # -- reading -------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def holds(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._lru

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def summary(self, limit: int = SUMMARY_MAX) -> list[str]:
        """The hashes most recently used first, at most ``limit``."""
        with self._lock:
            return list(reversed(self._lru))[:max(0, limit)]

    def get(self, sha256: str, *, hold: bool = False) -> Path:
        """The local file of ``sha256``, fetched once if needed; CacheError when it cannot
        be had. With ``hold`` the entry is kept from eviction until ``release``."""
        if not valid_sha256(sha256):
            raise CacheError(f"not a sha256: {sha256[:80]!r}")
        while True:
            with self._lock:
                if sha256 in self._lru:
                    self._lru.move_to_end(sha256)
                    if hold:
                        self._held[sha256] = self._held.get(sha256, 0) + 1
                    self.hits += 1
                    path = self.path(sha256)
                    break
                waiting = self._inflight.get(sha256)
                if waiting is None:
                    mine = threading.Event()
                    self._inflight[sha256] = mine
            if waiting is not None:
                waiting.wait()
                with self._lock:
                    failed = self._errors.get(sha256)
                    if failed is not None and sha256 not in self._lru:
                        raise CacheError(failed)
                continue
            self._fetch(sha256, mine, hold)
            path = self.path(sha256)
            break
        self._touch(path)
        return path

    def _touch(self, path: Path) -> None:
        """Mark ``path`` used now (its mtime, strictly increasing: the LRU order)."""
        with self._lock:
            stamp = self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        with contextlib.suppress(OSError):
            os.utime(path, ns=(stamp, stamp))

    @contextlib.contextmanager
    def use(self, sha256: str) -> Iterator[Path]:
        """``get`` with a hold for the duration of the block."""
        path = self.get(sha256, hold=True)
        try:
            yield path
        finally:
            self.release(sha256)

    def release(self, sha256: str) -> None:
        with self._lock:
            count = self._held.get(sha256, 0) - 1
            if count > 0:
                self._held[sha256] = count
            else:
                self._held.pop(sha256, None)
        self._evict()

    # -- fetching ------------------------------------------------------------------

    def _fetch(self, sha256: str, done: threading.Event, hold: bool) -> None:
        dest = self.incoming / sha256
        try:
            if self.fetch is None:
                raise CacheError(f"input {sha256[:12]}… is not cached and nothing fetches")
            self.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                self.fetch(sha256, dest)
            except CacheError:
                raise
            except Exception as err:
                raise CacheError(f"cannot fetch input {sha256[:12]}…: {err}") from err
            final = self.path(sha256)
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                size = dest.stat().st_size
                os.replace(dest, final)
            except OSError as err:
                raise CacheError(f"cannot store input {sha256[:12]}…: {err}") from err
        except CacheError as err:
            with self._lock:
                self._errors[sha256] = str(err)
                del self._inflight[sha256]
            done.set()
            raise
        with self._lock:
            self._lru[sha256] = size
            self._lru.move_to_end(sha256)
            self._errors.pop(sha256, None)
            if hold:
                self._held[sha256] = self._held.get(sha256, 0) + 1
            self.fetches += 1
            del self._inflight[sha256]
        done.set()
        log.info("cached input %s… (%d bytes)", sha256[:12], size)
        self._evict()

    # -- eviction ------------------------------------------------------------------

    def _evict(self) -> None:
        """Drop the least recently used files (never held ones) until under the cap."""
        gone: list[str] = []
        with self._lock:
            total = sum(self._lru.values())
            for sha in list(self._lru)[:-1]:  # the newest stays, even over the cap
                if total <= self.cap_bytes:
                    break
                if sha in self._held:
                    continue
                total -= self._lru.pop(sha)
                gone.append(sha)
            self.evictions += len(gone)
        for sha in gone:
            with contextlib.suppress(FileNotFoundError):
                self.path(sha).unlink()
            log.debug("evicted input %s… from the cache", sha[:12])

    def _load(self) -> None:
        """What a previous run left: files named by their hash, ordered by last use."""
        found: list[tuple[int, str, int]] = []
        if self.objects.is_dir():
            for path in self.objects.glob("??/*"):
                if not valid_sha256(path.name) or path.parent.name != path.name[:2]:
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue
                found.append((st.st_mtime_ns, path.name, st.st_size))
        for mtime, sha, size in sorted(found):
            self._lru[sha] = size
            self._last_stamp = max(self._last_stamp, mtime)
        if self.incoming.is_dir():  # unfinished fetches restart from scratch
            for junk in self.incoming.iterdir():
                with contextlib.suppress(OSError):
                    junk.unlink()
        if found:
            log.info("input cache holds %d file(s), %d bytes", len(found),
                     sum(size for _m, _s, size in found))
        self._evict()


class FetchNotice:
    """Calls ``changed()`` when ``cache`` fetched something since the last call, at most
    every ``every_s`` (the worker republishes its caps, which carry the cache's summary,
    when a job brought new inputs; not once per job)."""

    def __init__(self, cache: InputCache, changed: Callable[[], None] | None,
                 every_s: float) -> None:
        self.cache = cache
        self.changed = changed
        self.every_s = every_s
        self._lock = threading.Lock()
        self._fetches = 0
        self._at = 0.0

    def check(self) -> None:
        with self._lock:
            now = time.monotonic()
            due = (self.changed is not None and self.cache.fetches != self._fetches
                   and now - self._at >= self.every_s)
            if due:
                self._fetches, self._at = self.cache.fetches, now
        if due and self.changed is not None:
            try:
                self.changed()
            except Exception as err:
                log.debug("cannot republish the caps: %s", err)
