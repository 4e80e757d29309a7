"""AuditWriter: exec reports written in batches, off the request lanes.

Every remote command ends with an ``exec.report``. Writing each in its own transaction
cost ~1 ms of coordinator CPU per command, which (with the embedded broker sharing the
process and the GIL) showed up in every command's round trip. Reports are queued and
written together every ``flush_s``; ``flush()`` makes them visible at once for readers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.store import Store

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(self, store: Store, flush_s: float = 0.2, max_batch: int = 500) -> None:
        self.store = store
        self.flush_s = flush_s
        self.max_batch = max_batch
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)
            if len(self._rows) >= self.max_batch:
                self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far (callers that read the audit trail call this)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                self.store.record_exec_audits(rows)
            except CoordinatorError as err:
                log.error("%d audit records not written: %s", len(rows), err)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("audit batch not written")
