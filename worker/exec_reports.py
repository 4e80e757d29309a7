"""ReportOutbox: every ``exec.report`` reaches the audit trail, even across crashes.

The coordinator acknowledges a report (``ok``) only once its audit row is committed
(coordinator/audit.py). Until then the report waits here, on disk under
``<state_dir>/reports/`` (so a worker restart keeps it too), and is sent again: at every
(re)connect of the worker, and when no answer came within ``RESEND_S`` (doubling up to
``RESEND_MAX_S``, or the coordinator's ``retry_after_s`` for ``rate_limited``). So a
coordinator killed with reports still in its write batch, or a broker that dropped
them, costs a delay, never a record; the store skips a report it already has (UNIQUE
reservation and exec id), so each is recorded once.

A report is given up only when the coordinator refuses it for good (``forbidden``: not
this worker's reservation; ``invalid``; ``not_found``), or when more than
``MAX_PENDING`` wait (the oldest goes, logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.bus import Bus, BusError, Incoming, Lane
from schemas.codec import envelope
from schemas.errors import WireError
from schemas.messages import Error, ExecReport, Ok
from schemas.topics import Topics

log = logging.getLogger(__name__)

DIR = "reports"
RESEND_S = 5.0  # first re-send when the coordinator did not answer
RESEND_MAX_S = 60.0
MAX_PENDING = 10_000
TICK_S = 0.5
RETRY_CODES = frozenset({"unavailable", "internal", "timeout", "rate_limited", "busy"})


KEEP_IDS = 4  # message ids of the latest sends of one report whose answer still counts


@dataclass
class _Pending:
    key: str
    report: ExecReport
    message_ids: list[str] = field(default_factory=list)
    next_at: float = 0.0
    attempts: int = 0


class ReportOutbox:
    """Unacknowledged exec reports of one worker (see the module docstring)."""

    def __init__(self, bus: Bus, topics: Topics, state_dir: Path | str, *,
                 coordinator: str, clock: Callable[[], float] = time.monotonic,
                 resend_s: float = RESEND_S, resend_max_s: float = RESEND_MAX_S) -> None:
        self.bus = bus
        self.topics = topics
        self.dir = Path(state_dir) / DIR
        self.coordinator = coordinator
        self.resend_s = resend_s
        self.resend_max_s = resend_max_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}  # key -> report
        self._by_message: dict[str, str] = {}  # message id of the last send -> key
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.acknowledged = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Load what a previous run left, listen for answers, start re-sending."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._load()
        self.bus.on_inbox(Ok.TYPE, self._on_answer, lane=Lane.EXEC)
        self.bus.on_inbox(Error.TYPE, self._on_answer, lane=Lane.EXEC)
        self.bus.on_connected(self._resend_all)
        self._thread = threading.Thread(target=self._run, name="exec-reports", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop re-sending (what is pending stays on disk for the next run)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- adding and sending ----------------------------------------------------------------

    def add(self, report: ExecReport) -> None:
        """Keep ``report`` (on disk) until acknowledged, and send it now."""
        key = hashlib.sha256(f"{report.reservation}\0{report.exec_id}".encode()).hexdigest()[:32]
        entry = _Pending(key, report)
        try:
            self._write(entry)
        except OSError as err:
            log.error("cannot keep exec.report %s on disk (%s); sending it anyway",
                      report.exec_id, err)
        with self._lock:
            self._pending[key] = entry
            dropped = self._trim_locked()
        for old in dropped:
            log.error("more than %d exec reports wait for the coordinator; dropped the "
                      "oldest (%s)", MAX_PENDING, old.report.exec_id)
            self._remove_file(old.key)
        self._send(entry)

    def _send(self, entry: _Pending) -> None:
        env = envelope(entry.report, reply_to=self.bus.inbox)
        with self._lock:
            if entry.key not in self._pending:
                return
            entry.message_ids.append(env.id)
            for old in entry.message_ids[:-KEEP_IDS]:
                self._by_message.pop(old, None)
            del entry.message_ids[:-KEEP_IDS]
            self._by_message[env.id] = entry.key
            entry.attempts += 1
            entry.next_at = self._clock() + min(
                self.resend_max_s, self.resend_s * 2 ** (entry.attempts - 1))
        try:
            self.bus.send(self.topics.coord_inbox, env)
        except (BusError, WireError, ValueError, RuntimeError) as err:
            log.warning("cannot send exec.report %s now (%s); will retry",
                        entry.report.exec_id, err)

    def _resend_all(self) -> None:
        """After a (re)connect: everything unacknowledged goes again at once."""
        with self._lock:
            entries = list(self._pending.values())
        if entries:
            log.info("re-sending %d unacknowledged exec report(s)", len(entries))
        for entry in entries:
            self._send(entry)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set() or not self.bus.connected.is_set():
                continue
            now = self._clock()
            with self._lock:
                due = [e for e in self._pending.values() if e.next_at <= now]
            for entry in due:
                self._send(entry)

    # -- answers ---------------------------------------------------------------------------

    def _on_answer(self, incoming: Incoming) -> None:
        """An ``ok`` or ``error`` from the coordinator for one of our sends."""
        re = incoming.message.re
        if incoming.sender != self.coordinator or re is None:
            return
        with self._lock:
            key = self._by_message.get(re)
            entry = self._pending.get(key) if key is not None else None
            if entry is None:
                self._by_message.pop(re, None)
                return
            body = incoming.body
            if isinstance(body, Error) and body.code in RETRY_CODES:
                retry = (body.detail or {}).get("retry_after_s")
                if body.code == "rate_limited" and isinstance(retry, (int, float)):
                    entry.next_at = self._clock() + float(retry)
                return  # the re-send schedule stands
            del self._pending[entry.key]
            for message_id in entry.message_ids:
                self._by_message.pop(message_id, None)
        if isinstance(body, Error):
            log.warning("the coordinator refused exec.report %s for good (%s: %s); "
                        "dropped", entry.report.exec_id, body.code, body.message)
        else:
            self.acknowledged += 1
        self._remove_file(entry.key)

    # -- disk --------------------------------------------------------------------------------

    def _trim_locked(self) -> list[_Pending]:
        dropped: list[_Pending] = []
        while len(self._pending) > MAX_PENDING:
            oldest = self._pending.pop(next(iter(self._pending)))
            for message_id in oldest.message_ids:
                self._by_message.pop(message_id, None)
            dropped.append(oldest)
        return dropped

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _write(self, entry: _Pending) -> None:
        path = self._path(entry.key)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(entry.report.to_dict(), fh)
        os.replace(tmp, path)

    def _remove_file(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def _load(self) -> None:
        files = sorted(self.dir.glob("*.json"), key=_mtime)
        loaded = 0
        for path in files[-MAX_PENDING:]:
            try:
                data: Any = json.loads(path.read_text())
                report = ExecReport.from_dict(data)
            except (OSError, ValueError, TypeError) as err:
                log.warning("dropped unreadable pending report %s: %s", path.name, err)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            self._pending[path.stem] = _Pending(path.stem, report)
            loaded += 1
        for tmp in self.dir.glob("*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        if loaded:
            log.info("%d exec report(s) from an earlier run wait for the coordinator", loaded)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
