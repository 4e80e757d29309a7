"""The receiver's record of one transfer, its states, and a JSON-file store for it.

A ``TransferRecord`` is what must survive a restart of the receiving side: who sends,
what (name, size, SHA-256, segment size, purpose), where acknowledgements go, and the
byte ranges already durable. The coordinator keeps it in its database; workers and
clients keep it as a small JSON file beside the partial file (``JsonStateStore``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from broker.transfer.ranges import ByteRanges
from schemas.transitions import StateMachine

log = logging.getLogger(__name__)


class TransferPhase(StrEnum):
    """Where an incoming transfer stands (docs/transfer.md has the diagram)."""

    RECEIVING = "receiving"  # partial file and ranges; segments welcome
    COMPLETE = "complete"  # verified and handed to storage; fin/init answer with ref
    FAILED = "failed"  # wrong hash or refused at fin; partial deleted
    ABORTED = "aborted"  # either side aborted, or it idled out; partial deleted


# The explicit transition table, through the project's one helper.
TRANSFER_MACHINE: StateMachine[TransferPhase] = StateMachine("transfer", {
    TransferPhase.RECEIVING: {TransferPhase.COMPLETE, TransferPhase.FAILED,
                              TransferPhase.ABORTED},
    TransferPhase.COMPLETE: set(),
    TransferPhase.FAILED: set(),
    TransferPhase.ABORTED: set(),
})
TRANSFER_MOVES = TRANSFER_MACHINE.transitions


@dataclass
class TransferRecord:
    """The persistent state of one incoming transfer, keyed by ``(peer, tid)``.

    ``peer`` is the authenticated principal that sends the segments (the uploader, or
    the holder of a download) and ``peer_inbox`` its base inbox, where acknowledgements
    go. ``have`` lists the durable ``[start, end)`` ranges.
    """

    tid: str
    peer: str
    peer_inbox: str
    direction: str  # "upload" (peer offered it) | "download" (we fetched it)
    name: str
    size: int
    sha256: str
    segment_size: int
    purpose: dict[str, Any]
    have: list[list[int]] = field(default_factory=list)
    phase: TransferPhase = TransferPhase.RECEIVING
    ref: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        return (self.peer, self.tid)

    def move(self, phase: TransferPhase) -> None:
        """Change phase through the transition table (a bad move is a bug: raises
        ``InvalidTransition``)."""
        if not TRANSFER_MACHINE.check(f"{self.peer}/{self.tid}", self.phase, phase):
            return
        self.phase = phase
        self.updated_at = time.time()

    def ranges(self) -> ByteRanges:
        return ByteRanges.from_wire(self.have, self.size)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TransferRecord:
        """A record read back from storage; ValueError/KeyError/TypeError when broken."""
        record = cls(**{k: data[k] for k in data if k in _FIELDS})
        record.phase = TransferPhase(record.phase)
        if not isinstance(record.purpose, dict) or not isinstance(record.have, list):
            raise ValueError("purpose must be an object and have a list")
        record.ranges()  # validates every pair against the size
        return record


_FIELDS = frozenset(TransferRecord.__dataclass_fields__)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file, fsync, rename (0600)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


class JsonStateStore:
    """Transfer records as small files in one directory (workers, clients, tests).

    A record is a JSON file written atomically (``save``); the ranges that grow with
    every acknowledgement go to an append-only journal beside it (``save_have``: one
    short line and one fdatasync, no rename, so acknowledging stays cheap). Loading
    takes the union of the record's ranges and the journal's last complete line (both
    only ever name durable bytes); ``save`` compacts the journal away. File names are a
    hash of ``(peer, tid)``, so any principal id is a safe name. A record that cannot be
    read back is logged and skipped, never fatal.
    """

    SUFFIX = ".xfer.json"
    JOURNAL = ".xfer.have"
    COMPACT_BYTES = 256 * 1024  # a journal this long is folded back into the record

    def __init__(self, directory: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.directory = Path(directory)
        self.durable = durable

    def path_of(self, peer: str, tid: str) -> Path:
        digest = hashlib.sha256(f"{peer}\0{tid}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}{self.SUFFIX}"

    def _journal(self, path: Path) -> Path:
        return path.with_name(path.name[: -len(self.SUFFIX)] + self.JOURNAL)

    def save(self, record: TransferRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_of(record.peer, record.tid)
        write_json_atomic(path, record.to_json(), durable=self.durable)
        self._journal(path).unlink(missing_ok=True)

    def save_have(self, record: TransferRecord) -> None:
        """Record ``record.have`` durably (it only ever grows while receiving)."""
        path = self.path_of(record.peer, record.tid)
        journal = self._journal(path)
        line = (json.dumps(record.have, separators=(",", ":")) + "\n").encode()
        fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            if self.durable:
                os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.COMPACT_BYTES:
            self.save(record)

    def load(self, peer: str, tid: str) -> TransferRecord | None:
        return self._read(self.path_of(peer, tid))

    def delete(self, record: TransferRecord) -> None:
        path = self.path_of(record.peer, record.tid)
        path.unlink(missing_ok=True)
        self._journal(path).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[TransferRecord]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            record = self._read(path)
            if record is not None:
                yield record

    def _read(self, path: Path) -> TransferRecord | None:
        try:
            record = TransferRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable transfer state %s: %s", path, err)
            return None
        latest = self._journal_tail(self._journal(path), record.size)
        if latest is not None:
            have = record.ranges()
            have.update(latest)
            record.have = [list(pair) for pair in have]
        return record

    @staticmethod
    def _journal_tail(journal: Path, size: int) -> ByteRanges | None:
        """The last complete, valid line of a journal (a crash may tear the last one)."""
        try:
            lines = journal.read_bytes().splitlines()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("ignoring unreadable transfer journal %s: %s", journal, err)
            return None
        for line in reversed(lines):
            try:
                return ByteRanges.from_wire(json.loads(line), size)
            except (ValueError, TypeError):
                continue
        return None
