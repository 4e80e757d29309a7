"""The worker's job attempts on disk, and their reports kept until the coordinator has them.

Every attempt the coordinator assigns here has a record (the ``AttemptRecord``) in the
worker's attempt journal, ``<state_dir>/jobs/attempts.journal`` (worker/attempt_journal.py:
one line appended per write, not a file per write), and a directory
``<state_dir>/jobs/<attempt>/`` holding ``work/`` (the job's work directory),
``stdout``/``stderr`` and ``outputs/`` (collected after the run). The record is written
and fdatasynced *before* the worker answers ``job.assign`` with ``ok`` (the answer is the
acknowledgement). The record's ``phase`` says how far the attempt got:

- ``assigned``: accepted, inputs being fetched;
- ``running``: the command was started (in memory only: on disk the record still says
  ``assigned``, which a restart treats the same way; one write fewer per job);
- ``finished``: the command ended; its result (``result``) is known, the files are being
  uploaded (resumed after a worker restart; written only when there is something to
  upload, else the record goes straight to ``reported``);
- ``reported``: the ``attempt.report`` (``report``) waits for the coordinator's ``ok``.

``ReportSender`` sends every ``reported`` attempt's report (on the worker's own thread,
with ``Bus.request_async``) at once, at every (re)connect, and again after ``RESEND_S``
(doubling up to ``RESEND_MAX_S``) until the coordinator answers ``ok`` (it does so only
once the result row is committed, and answers a duplicate ``ok`` too); then the attempt's
record and directory go. A coordinator or broker that is down costs a delay, never a
result. A report refused for good (``forbidden``, ``invalid``, ``not_found``) is dropped,
logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.bus import Bus, BusError
from schemas.codec import Envelope
from schemas.errors import WireError
from schemas.job_messages import AttemptRecorded, AttemptReport
from schemas.messages import Error
from schemas.topics import Topics
from worker.attempt_journal import COMPACT_BYTES, AttemptJournal
from worker.executors.base import SessionHandle
from worker.sessions import remove_tree

if TYPE_CHECKING:
    from worker.executors.base import Executor, ExitResult
    from worker.io_loop import Timer
    from worker.job_files import Captures

log = logging.getLogger(__name__)

DIR = "jobs"
JOURNAL = "attempts.journal"
LEGACY_RECORD = "attempt.json"  # a record per directory, before the journal (read once)
RESEND_S = 5.0
RESEND_MAX_S = 60.0
TICK_S = 0.5
RETRY_CODES = frozenset({"unavailable", "internal", "timeout", "rate_limited", "busy"})
PHASES = ("assigned", "running", "finished", "reported")


@dataclass
class AttemptRecord:
    """One attempt as persisted (see the module docstring)."""

    attempt: str
    job: str
    owner: str
    spec: dict[str, Any]
    inputs: list[dict[str, Any]]
    stdin: dict[str, Any] | None = None
    executor: str = "process"
    phase: str = "assigned"
    assigned_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    handle: dict[str, Any] | None = None  # the executor session's handle
    result: dict[str, Any] | None = None  # kind + Outcome fields, once finished
    report: dict[str, Any] | None = None  # the attempt.report body, once built

    def to_dict(self) -> dict[str, Any]:
        """The fields, shallow: the record is written often (``dataclasses.asdict`` deep
        copies every spec, input and report first)."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> AttemptRecord:
        if not isinstance(data, dict):
            raise ValueError("not an attempt record")
        names = set(cls.__dataclass_fields__)
        record = cls(**{k: v for k, v in data.items() if k in names})
        if record.phase not in PHASES or not record.attempt or not record.job:
            raise ValueError(f"attempt record in unknown phase {record.phase!r}")
        return record


_RECORD_FIELDS = tuple(f.name for f in fields(AttemptRecord))


@dataclass
class Attempt:
    """One attempt at run time in worker/job_runner.py (its record is on disk)."""

    record: AttemptRecord
    handle: SessionHandle | None = None
    task: Any = None  # the executor's TaskHandle while running
    kill_reason: str | None = None
    executor: Executor | None = None
    captures: Captures | None = None
    workdir: Path | None = None
    timer: Timer | None = None  # on the executor's I/O loop: attempt.started, wall clock
    timed_out: bool = False
    exit: ExitResult | None = None  # the command's result, once known
    closing: bool = False  # its session is being closed (its dir is removed after)
    remove_after_close: bool = False  # the report was acknowledged meanwhile
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.record.attempt

    @property
    def holds_slot(self) -> bool:
        return self.record.phase in ("assigned", "running")


class AttemptStore:
    """``<state_dir>/jobs/``: the attempt journal, and one directory per attempt."""

    def __init__(self, state_dir: Path | str, *, compact_bytes: int = COMPACT_BYTES) -> None:
        self.root = Path(state_dir) / DIR
        self.journal = AttemptJournal(self.root / JOURNAL, compact_bytes=compact_bytes)
        self._dirs: set[str] = set()  # attempts whose directory exists: no mkdir per save

    def path(self, attempt: str) -> Path:
        return self.root / attempt

    def workdir(self, attempt: str) -> Path:
        return self.path(attempt) / "work"

    def save(self, record: AttemptRecord, *, durable: bool = False) -> None:
        """Append the record to the journal (its directory, 0700, made first); OSError if
        not.

        ``durable`` also fdatasyncs it, for the records whose loss in a power cut would
        break a promise: the report (the outcome). The acceptance is made durable by
        ``sync`` before its ``ok`` goes, or by its report's fdatasync when the report
        answers the assignment instead (worker/assign_answers.py). The phases between are
        only written through: a process crash keeps them, and a power cut that loses one
        leaves an earlier phase, which a restart treats as unfinished (the coordinator
        requeues the job).
        """
        if record.attempt not in self._dirs:
            self.path(record.attempt).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dirs.add(record.attempt)
        self.journal.put(record.to_dict(), durable=durable)

    def sync(self) -> None:
        """Every record saved so far durable (OSError if not): before an ``ok`` to an
        assignment whose acceptance was saved without (worker/assign_answers.py)."""
        self.journal.sync()

    def load_all(self) -> list[AttemptRecord]:
        """Every usable record, by attempt id (once, at start): the journal replayed and
        compacted; directories without a record and stray files are removed, logged. The
        records of a worker before the journal (``<attempt>/attempt.json``) are taken
        over: the journal's win over them, and their files go once it holds them."""
        if not self.root.is_dir():
            return []
        entries = self.journal.replay()
        legacy: list[Path] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name in (self.journal.path.name, self.journal.tmp.name):
                continue
            if not entry.is_dir() or entry.is_symlink():
                log.warning("removing a stray entry in %s: %s", self.root, entry.name)
                with contextlib.suppress(OSError):
                    entry.unlink()
            elif (entry / LEGACY_RECORD).exists():
                legacy.append(entry / LEGACY_RECORD)
                with contextlib.suppress(OSError, ValueError):
                    entries.setdefault(entry.name, json.loads(legacy[-1].read_text()))
        records: dict[str, AttemptRecord] = {}
        for attempt, data in sorted(entries.items()):
            try:
                records[attempt] = AttemptRecord.from_dict(data)
            except (ValueError, TypeError) as err:
                log.warning("dropping an unusable record of attempt %s: %s", attempt, err)
        self.journal.rewrite({a: r.to_dict() for a, r in records.items()})
        for path in legacy:
            with contextlib.suppress(OSError):
                path.unlink()
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if entry.name in records:
                    self._dirs.add(entry.name)
                else:
                    log.warning("removing attempt dir without a record: %s", entry.name)
                    remove_tree(entry)
        return list(records.values())

    def remove(self, attempt: str) -> None:
        """Forget the attempt: a ``del`` in the journal (not synced: one lost in a power
        cut brings back an acknowledged report, which is sent again and answered as a
        duplicate), then its directory."""
        self._dirs.discard(attempt)
        try:
            self.journal.delete(attempt)
        except OSError as err:  # (as a lost del; the directory goes all the same)
            log.error("cannot journal the removal of attempt %s: %s", attempt, err)
        remove_tree(self.path(attempt))

    def close(self) -> None:
        self.journal.close()


@dataclass
class _Pending:
    record: AttemptRecord
    next_at: float = 0.0
    tries: int = 0
    future: Future[Envelope[Any]] | None = field(default=None, repr=False)


class ReportSender:
    """Attempt reports re-sent until the coordinator acknowledges them (module docstring).

    ``on_done(attempt)`` runs once an attempt's report was acknowledged or refused for
    good, after its directory was removed.
    """

    def __init__(self, bus: Bus, topics: Topics, store: AttemptStore, *,
                 on_done: Callable[[str], None] | None = None,
                 remove: Callable[[str], None] | None = None,
                 without_inline: Callable[[AttemptRecord], None] | None = None,
                 carried: Callable[[list[dict[str, Any]]], None] | None = None,
                 resend_s: float = RESEND_S, resend_max_s: float = RESEND_MAX_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.topics = topics
        self.store = store
        self.on_done = on_done
        self.remove = remove or store.remove  # the attempt's directory, once acknowledged
        # a report with small results inline refused `invalid` (a coordinator older than
        # `inline`): handed back, to be delivered again with them uploaded (job_delivery)
        self.without_inline = without_inline
        # the job.assign messages an answer carries (attempt.recorded): the job runner's
        self.carried = carried
        self.resend_s = resend_s
        self.resend_max_s = resend_max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        # stepped at the next wake: new reports and answered sends; every entry is looked
        # at once per TICK_S (resends), not at every wake (a wake per job at full rate)
        self._ready: list[str] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.acknowledged = 0

    def start(self) -> None:
        self.bus.on_connected(self._send_all_now)
        self._thread = threading.Thread(target=self._run, name="job-reports", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop sending (what waits stays on disk for the next run)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def add(self, record: AttemptRecord) -> None:
        """Send ``record.report`` (already persisted) now and until acknowledged."""
        with self._lock:
            self._pending[record.attempt] = _Pending(record)
            self._ready.append(record.attempt)
        self._wake.set()

    def _answered(self, attempt: str, future: Future[Envelope[Any]]) -> None:
        """A send's future settled (any thread: the network thread's, for a reply): step
        that entry at the next wake. The next attempts that ride in the answer
        (``attempt.recorded``) go to the job runner at once (``carried``: it queues them
        on its lane, as a ``job.assign`` received alone)."""
        if self.carried is not None and not future.cancelled() and future.exception() is None:
            body = future.result().body
            if isinstance(body, AttemptRecorded) and body.assign:
                try:
                    self.carried(body.assign)
                except Exception:  # (they expire at the coordinator and go elsewhere)
                    log.exception("the assignments carried in a report's answer")
        with self._lock:
            self._ready.append(attempt)
        self._wake.set()

    def _send_all_now(self) -> None:
        with self._lock:
            for entry in self._pending.values():
                entry.next_at = 0.0
                entry.future = None
            self._ready.extend(self._pending)
        self._wake.set()

    def _run(self) -> None:
        scan_at = 0.0
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            with self._lock:
                if now >= scan_at:
                    scan_at = now + TICK_S
                    entries = list(self._pending.values())
                else:
                    entries = [self._pending[a] for a in dict.fromkeys(self._ready)
                               if a in self._pending]
                self._ready.clear()
            for entry in entries:
                try:
                    self._step(entry)
                except Exception:  # this thread sends every report: it must not end
                    log.exception("attempt.report %s", entry.record.attempt)

    def _step(self, entry: _Pending) -> None:
        future = entry.future
        if future is not None and future.done():
            entry.future = None
            try:
                reply = future.result()
            except Exception as err:  # the bus dropped it (disconnect, stop)
                log.debug("attempt.report %s: %s", entry.record.attempt, err)
                return
            body = reply.body
            if isinstance(body, Error) and body.code in RETRY_CODES:
                retry = (body.detail or {}).get("retry_after_s")
                if body.code == "rate_limited" and isinstance(retry, (int, float)):
                    entry.next_at = self._clock() + float(retry)
                return
            if (isinstance(body, Error) and body.code == "invalid" and self.without_inline
                    is not None and (entry.record.report or {}).get("inline")):
                log.warning("the coordinator refused the report of attempt %s with its small "
                            "results inline (%s); uploading them instead",
                            entry.record.attempt, body.message)
                with self._lock:
                    self._pending.pop(entry.record.attempt, None)
                self.without_inline(entry.record)
                return
            if isinstance(body, Error):
                log.warning("the coordinator refused the report of attempt %s for good "
                            "(%s: %s); dropped", entry.record.attempt, body.code, body.message)
            else:
                self.acknowledged += 1
                kind = (entry.record.report or {}).get("kind")
                # a line per job at INFO only when it did not succeed (at hundreds of jobs
                # per second the successes would be most of the log; the coordinator's
                # store keeps every attempt: `xcloud job show`)
                log.log(logging.DEBUG if kind == "success" else logging.INFO,
                        "attempt %s of job %s (owner %s) reported (%s)", entry.record.attempt,
                        entry.record.job, entry.record.owner, kind)
            self._finish(entry)
            return
        if self._clock() < entry.next_at or not self.bus.connected.is_set():
            return  # (an unanswered send is sent again when next_at passes)
        if future is not None and not future.done():
            future.cancel()
        entry.tries += 1
        entry.next_at = self._clock() + min(self.resend_max_s,
                                            self.resend_s * 2 ** (entry.tries - 1))
        try:
            report = AttemptReport.from_dict(dict(entry.record.report or {}))
            entry.future = self.bus.request_async(self.topics.coord_inbox, report)
            attempt = entry.record.attempt
            entry.future.add_done_callback(lambda f: self._answered(attempt, f))
        except (WireError, ValueError, TypeError) as err:
            log.error("attempt %s has an unsendable report (%s); dropped",
                      entry.record.attempt, err)
            self._finish(entry)
        except (BusError, RuntimeError) as err:
            log.warning("cannot send attempt.report %s now (%s); will retry",
                        entry.record.attempt, err)

    def _finish(self, entry: _Pending) -> None:
        with self._lock:
            self._pending.pop(entry.record.attempt, None)
        with contextlib.suppress(OSError):
            self.remove(entry.record.attempt)
        if self.on_done is not None:
            self.on_done(entry.record.attempt)


def close_left_session(record: AttemptRecord,
                       executor_for: Callable[[str], Executor]) -> None:
    """The session an attempt interrupted by a stop left (its processes or container),
    closed after a restart; a failure is logged."""
    if not record.handle:
        return
    try:
        handle = SessionHandle.from_dict(record.handle)
        executor_for(record.executor).close_session(handle)
    except Exception as err:
        log.warning("cannot clean the session of attempt %s: %s", record.attempt, err)
