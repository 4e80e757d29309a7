"""The worker's attempt records as one append-only journal file.

Writing a file per record (tmp file + rename, up to three times per job) made allocating
inodes a large share of the worker's CPU per job on a journal-less file system; appending
a line to one open file costs a ``write``. Each line is a JSON object: ``{"put": record}``
(the attempt's record as of now) or ``{"del": attempt}`` (it is gone). Replaying the file
in order gives the live records: the last ``put`` of an attempt wins, a ``del`` drops it.

A crash mid-append leaves a torn last line, which a replay ignores (its ``save`` never
returned). The file is rewritten with only the live records (tmp file, fsync, rename)
when the worker starts and whenever it has grown past a threshold, so it stays small.
A durable put is ``fdatasync``-ed before it returns; durable puts that wait together
share one ``fdatasync`` (group commit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPACT_BYTES = 4 << 20  # rewrite the journal once it has grown past this
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def _line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(size - 1)
        return file.read(1)


class AttemptJournal:
    """One journal file; ``put``/``delete`` are safe from any thread."""

    def __init__(self, path: Path | str, *, compact_bytes: int = COMPACT_BYTES) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.compact_bytes = compact_bytes
        self._cond = threading.Condition(threading.Lock())  # guards all below
        self._fd: int | None = None  # opened on the first write, or by ``rewrite``
        self._size = 0
        self._limit = compact_bytes  # compact past this: twice the last compacted size
        self._live: dict[str, bytes] = {}  # attempt -> its last put line (for compaction)
        self._written = 0  # entries appended so far
        self._synced = 0  # entries known to be on disk
        self._syncing = False  # a thread is in fdatasync (on ``_fd``: do not close it)

    def replay(self) -> dict[str, dict[str, Any]]:
        """The live records in the file, read only (no file: none)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        records: dict[str, dict[str, Any]] = {}
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict) or len(entry) != 1:
                    raise ValueError("not one put or del")
                if "put" in entry and isinstance(entry["put"], dict) \
                        and isinstance(entry["put"].get("attempt"), str):
                    records[entry["put"]["attempt"]] = entry["put"]
                elif "del" in entry and isinstance(entry["del"], str):
                    records.pop(entry["del"], None)
                else:
                    raise ValueError("not one put or del")
            except ValueError as err:  # (json's errors and UnicodeDecodeError are too)
                if any(rest.strip() for rest in lines[number:]):
                    log.warning("%s line %d skipped: %s", self.path, number, err)
                else:  # a crash mid-append: that save never returned
                    log.info("%s: ignoring a torn last line", self.path)
        return records

    def rewrite(self, records: dict[str, dict[str, Any]]) -> None:
        """Replace the file with exactly ``records`` (durably) and append from there on."""
        with self._cond:
            self._live = {attempt: _line({"put": record}) for attempt, record in records.items()}
            self._compact()

    def put(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Append the record (``record["attempt"]`` names it); OSError if not."""
        attempt = str(record["attempt"])
        line = _line({"put": record})
        with self._cond:
            self._append(line)
            self._live[attempt] = line
            seq = self._written
            self._maybe_compact()
            if durable:
                self._sync(seq)

    def sync(self) -> None:
        """Make every entry appended so far durable (one ``fdatasync``, shared with the
        durable puts waiting meanwhile; none when all are durable already)."""
        with self._cond:
            if self._fd is not None:
                self._sync(self._written)

    def delete(self, attempt: str) -> None:
        """Append a ``del`` (written through, not synced: see AttemptStore.remove)."""
        with self._cond:
            self._append(_line({"del": attempt}))
            self._live.pop(attempt, None)
            self._maybe_compact()

    def close(self) -> None:
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:  # a store dropped without close() must not leak its fd
        with contextlib.suppress(Exception):
            if self._fd is not None:
                os.close(self._fd)

    # -- under self._cond ---------------------------------------------------------------

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        view = memoryview(line)
        while view:  # one write of the whole line; loop only on a short write
            view = view[os.write(self._fd, view):]
        self._size += len(line)
        self._written += 1

    def _open(self) -> None:
        """Append to the file as it is (a ``save`` before any ``rewrite``): its records are
        read first, for a compaction to keep them."""
        self._live = {a: _line({"put": r}) for a, r in self.replay().items()}
        created = not self.path.exists()
        fd = os.open(self.path, FLAGS, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and _last_byte(self.path, size) != b"\n":  # a torn last line: end it
                os.write(fd, b"\n")
                size += 1
            if created:
                _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size

    def _sync(self, seq: int) -> None:
        """Return once entry ``seq`` is on disk: one thread syncs for all that wait."""
        while self._synced < seq:
            if self._syncing:
                self._cond.wait()
                continue
            fd, target = self._fd, self._written
            assert fd is not None
            self._syncing = True
            self._cond.release()  # others append meanwhile; their sync is the next one
            try:
                os.fdatasync(fd)
            finally:
                self._cond.acquire()
                self._syncing = False
                self._cond.notify_all()
            self._synced = max(self._synced, target)

    def _maybe_compact(self) -> None:
        if self._size > self._limit:
            try:
                self._compact()
            except OSError as err:  # the entry itself is written: keep appending
                log.error("cannot compact %s: %s", self.path, err)

    def _compact(self) -> None:
        while self._syncing:  # never close the fd under an fdatasync
            self._cond.wait()
        data = b"".join(self._live.values())
        fd = os.open(self.tmp, FLAGS | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size = fd, len(data)  # (O_APPEND: it now appends to the journal)
        self._limit = max(self.compact_bytes, 2 * len(data))
        self._synced = self._written
        log.debug("%s compacted: %d live records, %d bytes", self.path, len(self._live),
                  len(data))
