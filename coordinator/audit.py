"""AuditWriter: exec reports written in batches, off the request lanes, acknowledged after.

Every remote command ends with an ``exec.report``. Writing each in its own transaction
cost ~1 ms of coordinator CPU per command, which (with the embedded broker sharing the
process and the GIL) showed up in every command's round trip. Reports are queued and
written together every ``flush_s``; ``flush()`` makes them visible at once for readers.

A report is acknowledged to its worker only after its batch committed (``on_written``):
a coordinator killed with reports still queued has acknowledged none of them, so the
workers send them again (worker/exec_reports.py) and the trail stays complete.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from coordinator.errors import CoordinatorError, StoreError
from coordinator.store import Store

log = logging.getLogger(__name__)

Written = Callable[[CoordinatorError | None], None]
"""Called with None once the row is committed, else with why it was not."""


class AuditWriter:
    def __init__(self, store: Store, flush_s: float = 0.2, max_batch: int = 500) -> None:
        self.store = store
        self.flush_s = flush_s
        self.max_batch = max_batch
        self._rows: list[tuple[dict[str, Any], Written | None]] = []
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

    def add(self, row: dict[str, Any], on_written: Written | None = None) -> None:
        with self._lock:
            self._rows.append((row, on_written))
            if len(self._rows) >= self.max_batch:
                self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far (callers that read the audit trail call this)."""
        with self._write_lock:
            with self._lock:
                batch, self._rows = self._rows, []
            if not batch:
                return
            error = self._write([row for row, _ in batch])
            if error is not None and len(batch) > 1 and not isinstance(error, StoreError):
                # One bad row must not sink (and, re-sent, sink again) the others.
                results = [self._write([row]) for row, _ in batch]
            else:
                results = [error] * len(batch)
            for (_, on_written), result in zip(batch, results, strict=True):
                if on_written is not None:
                    try:
                        on_written(result)
                    except Exception:
                        log.exception("audit acknowledgement failed")

    def _write(self, rows: list[dict[str, Any]]) -> CoordinatorError | None:
        try:
            self.store.record_exec_audits(rows)
        except CoordinatorError as err:
            log.error("%d audit record(s) not written: %s", len(rows), err)
            return err
        except Exception as err:
            log.exception("%d audit record(s) not written", len(rows))
            return StoreError(f"audit records not written: {err}")
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("audit batch not written")
