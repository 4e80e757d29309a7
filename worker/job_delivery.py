"""ResultDelivery: an ended attempt's files become the owner's data, then its report goes.

stdout, stderr and the collected outputs are uploaded to the coordinator as data objects
of the job's owner (purpose ``{kind: data, owner, name: <job>/stdout | <job>/stderr |
<job>/outputs/<name>, grant: <attempt>}``), retried with back-off while the coordinator or
the broker is away (a worker that stops resumes them at its next start: the record says
``finished``); then the ``attempt.report`` is built, written durably (``reported``) and
handed to the ``ReportSender`` (worker/job_attempts.py), which sends it until it is
acknowledged. Apart from worker/job_runner.py, which runs attempts.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.bus import BusError
from broker.transfer import (
    REFUSED_FOR_GOOD,
    Peer,
    TransferEndpoint,
    TransferError,
    TransferRefused,
)
from schemas.job_messages import INLINE_MAX_BYTES, INLINE_MAX_FILES
from schemas.outcome import ERROR_MAX
from worker.job_attempts import AttemptRecord, AttemptStore, ReportSender
from worker.job_files import DATA_NAME_MAX

log = logging.getLogger(__name__)

UPLOAD_RETRY_S = 2.0
UPLOAD_RETRY_MAX_S = 30.0


class ResultDelivery:
    """See the module docstring. ``save`` writes a record (the runner's, which logs a
    failure); ``stopping`` ends the retries."""

    def __init__(self, store: AttemptStore, transfers: TransferEndpoint, peer: Peer,
                 reports: ReportSender, stopping: threading.Event,
                 save: Callable[..., None]) -> None:
        self.store = store
        self.transfers = transfers
        self.peer = peer
        self.reports = reports
        self.stopping = stopping
        self.save = save
        # False once a coordinator refused a report for its inline results (older than
        # them): every later attempt uploads its results, until the worker restarts
        self.inline = True
        reports.without_inline = self.without_inline

    def without_inline(self, record: AttemptRecord) -> None:
        """The coordinator refused the report's ``inline`` (``invalid``: it predates them):
        deliver the attempt again, its small results uploaded, on a thread of its own
        (uploads wait; this is the report sender's)."""
        self.inline = False
        record.report = None
        record.phase = "finished"
        threading.Thread(target=self.deliver, args=(record,), daemon=True,
                         name=f"deliver-{record.attempt}").start()

    def has_uploads(self, record: AttemptRecord) -> bool:
        """Whether delivering has files to upload (a non-empty stdout or stderr, an
        output): only then is the ``finished`` phase worth a write of its own."""
        if (record.result or {}).get("outputs"):
            return True
        directory = self.store.path(record.attempt)
        for stream in ("stdout", "stderr"):
            try:
                if (directory / stream).stat().st_size:
                    return True
            except OSError:
                continue
        return False

    def deliver(self, record: AttemptRecord, *, uploads: bool = True) -> None:
        """Upload stdout, stderr and outputs (until the coordinator takes them), then
        build the report, persist it and hand it to the sender. ``uploads`` False: the
        caller's ``has_uploads`` found nothing to upload (no file is looked at again)."""
        result = dict(record.result or {})
        directory = self.store.path(record.attempt)
        delay = UPLOAD_RETRY_S
        refused: list[str] = []
        refs: dict[str, dict[str, Any] | None] = {"stdout": None, "stderr": None}
        files: list[dict[str, Any]] = []
        inline: dict[str, str] | None = None
        while uploads:
            refused.clear()
            # sha256 -> base64: small results ride in the report (coordinator permitting)
            inline = {} if self.inline else None
            try:
                refs = {stream: self.upload(record, directory / stream,
                                             f"{record.job}/{stream}", refused, inline)
                        for stream in ("stdout", "stderr")}
                files = []
                for item in result.get("outputs") or []:
                    ref = self.upload(record, Path(item["path"]),
                                       f"{record.job}/outputs/{item['name']}", refused, inline)
                    if ref is not None:
                        files.append({"name": item["name"], **ref})
                break
            except (TransferError, BusError) as err:  # the coordinator or broker is away
                if self.stopping.wait(delay):
                    log.info("attempt %s: uploads resume at the next start", record.attempt)
                    return
                log.warning("attempt %s: cannot upload its results yet (%s); retrying",
                            record.attempt, err)
                delay = min(UPLOAD_RETRY_MAX_S, delay * 2)
        if refused:
            error = "; ".join([*([result["error"]] if result.get("error") else []),
                               *refused])
            result["error"] = error[:ERROR_MAX]
        fields = {k: v for k, v in result.items()
                  if k not in ("kind", "outputs") and v is not None}
        record.report = {"attempt": record.attempt, "kind": result["kind"], **fields,
                         "stdout": refs["stdout"], "stderr": refs["stderr"],
                         "outputs": files, "started_at": record.started_at,
                         "ended_at": record.ended_at,
                         "inline": [{"sha256": k, "data": v}
                                    for k, v in (inline or {}).items()] or None}
        record.report = {k: v for k, v in record.report.items()
                         if v is not None or k in ("stdout", "stderr")}
        record.phase = "reported"
        self.save(record, durable=True)
        self.reports.add(record)

    def upload(self, record: AttemptRecord, path: Path, name: str, refused: list[str],
               inline: dict[str, str] | None = None) -> dict[str, Any] | None:
        """One file as the owner's data object; None for a missing or empty file, and
        for one the coordinator refuses for good (the attempt is no longer current, the
        owner's quota is full, ...: noted in ``refused``). Other TransferErrors (the
        coordinator or the broker away) propagate: the caller retries. A file of at most
        INLINE_MAX_BYTES goes into ``inline`` (base64 by sha256, at most INLINE_MAX_FILES
        of them) for the report to carry instead (coordinator/inline_results.py)."""
        try:
            size = path.stat().st_size
        except OSError:
            return None
        if size == 0:
            return None
        if inline is not None and size <= INLINE_MAX_BYTES and len(inline) < INLINE_MAX_FILES:
            try:
                data = path.read_bytes()
            except OSError:
                return None
            if 0 < len(data) <= INLINE_MAX_BYTES:
                digest = hashlib.sha256(data).hexdigest()
                inline[digest] = base64.b64encode(data).decode("ascii")
                return {"sha256": digest, "size": len(data)}
        purpose = {"kind": "data", "owner": record.owner, "name": name[:DATA_NAME_MAX],
                   "grant": record.attempt}
        tid = hashlib.sha256(f"{record.attempt}\0{name}".encode()).hexdigest()[:32]
        try:
            result = self.transfers.upload(self.peer, path, purpose=purpose,
                                           name=name[:DATA_NAME_MAX], tid=tid)
        except TransferRefused as err:
            if err.code not in REFUSED_FOR_GOOD:
                raise
            log.warning("attempt %s: the coordinator refused %s (%s: %s)", record.attempt,
                        name, err.code, err)
            refused.append(f"{name.rpartition('/')[2] or name} not kept: {err}")
            return None
        return {"sha256": result.sha256, "size": result.size}
