"""MonitoringService: the coordinator's monitoring thread and what it owns.

Every ``rollup_s`` one pass: store the grid-wide snapshot, roll up and prune the time
series (``Rollup``), and feed the exec-duration histogram from the audit rows written
since the previous pass. The heartbeat path only gains one cheap listener
(``RunningWork.on_heartbeat``); everything else reads what was already written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker.config import MonitoringConfig
from coordinator.errors import CoordinatorError
from coordinator.monitoring.grid_series import GridSampler, RunningWork
from coordinator.monitoring.job_metrics import JobCollector, JobSeries
from coordinator.monitoring.prometheus import GridCollector, coordinator_registry
from coordinator.monitoring.rollup import PassReport, Rollup
from coordinator.monitoring.tiers import GRID_RES, parse_tiers
from coordinator.store import Store

log = logging.getLogger(__name__)

AUDIT_BATCH = 5_000


class MonitoringService:
    """Owns the sampler, the roll-up, the Prometheus registry and the pass thread."""

    def __init__(self, config: MonitoringConfig, store: Store, *,
                 heartbeats_total: Callable[[], int],
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.tiers = parse_tiers(config.tiers)
        self._clock = clock
        self.running = RunningWork(clock)
        self.heartbeats_total = heartbeats_total
        self.sampler = GridSampler(store, heartbeats_total=heartbeats_total,
                                   running=self.running, clock=clock)
        self.jobs = JobSeries(store, clock)
        self.sampler.sources.append(self.jobs.source)
        self.rollup = Rollup(store, raw_retention_s=config.raw_retention_s, tiers=self.tiers)
        self.collector = GridCollector(store, self.sampler, self.running,
                                       heartbeats_total=heartbeats_total,
                                       per_worker=config.per_worker_metrics)
        self.registry, self.exec_durations = coordinator_registry(
            self.collector, JobCollector(store, self.jobs))
        self.last_pass: PassReport | None = None
        self._audit_after: int | None = None
        self._pass_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the first pass now (what a start leaves in the tables is then settled for
        ``rollup_s``), then one every ``rollup_s`` in the thread."""
        self._stop.clear()
        self._pass_logged()
        self._thread = threading.Thread(target=self._loop, name="metrics-rollup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        interval = max(1.0, self.config.rollup_s)
        while True:
            wait = interval if not (self.last_pass and self.last_pass.behind) else 0.5
            if self._stop.wait(wait):
                return
            self._pass_logged()

    def _pass_logged(self) -> None:
        try:
            self.run_pass()
        except CoordinatorError as err:
            log.error("metrics pass failed: %s", err)
        except Exception:
            log.exception("metrics pass failed")

    def run_pass(self, now: float | None = None) -> PassReport:
        """One pass (the thread's; tests call it with a synthetic ``now``)."""
        with self._pass_lock:  # the thread's passes and a caller's never overlap
            now = self._clock() if now is None else now
            self.record_grid_sample(now)
            report = self.rollup.run(now)
            self._observe_execs()
            self.last_pass = report
        if report.samples or report.deleted:
            log.debug("metrics pass: %s", report)
        return report

    def record_grid_sample(self, now: float) -> None:
        values = self.sampler.snapshot(max_age_s=0.0)
        bucket = int(now // GRID_RES * GRID_RES)
        self.store.merge_grid_samples(
            [(name, GRID_RES, bucket, 1, value, value, value) for name, value in values.items()])

    def _observe_execs(self) -> None:
        if self._audit_after is None:  # only what runs from now on: counters start at zero
            self._audit_after = self.store.max_exec_report_id()
            return
        rows = self.store.exec_reports_after(self._audit_after, AUDIT_BATCH)
        if rows:
            self.exec_durations.observe(rows)
            self._audit_after = int(rows[-1][0])
