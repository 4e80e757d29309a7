"""Batch jobs in the grid-wide series and in ``/metrics`` (docs/monitoring.md).

``JobSeries.source`` is one of ``GridSampler.sources``: ``jobs_queued``,
``jobs_running``, ``jobs_held`` (now) and ``jobs_completed_per_min``,
``jobs_failed_per_min`` (over about the last minute, from the growth of the terminal
counts: jobs are never deleted, so the totals only grow). ``JobCollector`` exports, at
scrape time and straight from the store (so they survive a coordinator restart):

- ``xcloud_jobs{state}``: jobs by state (a gauge);
- ``xcloud_job_attempts_ended_total{kind}``: attempts that ended, by how (a counter);
- ``xcloud_job_duration_seconds{state}``: submit-to-end time of ended jobs (a histogram
  whose buckets are counted in SQL).

Labels are the job states and attempt kinds: fixed sets; no job or attempt ids.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.job_state import ENDINGS, TERMINAL, JobState
from coordinator.monitoring.job_queries import (
    attempts_ended_by_kind,
    job_duration_buckets,
    job_state_counts,
)
from coordinator.store import Store

JOB_SERIES = ["jobs_queued", "jobs_running", "jobs_held", "jobs_completed_per_min",
              "jobs_failed_per_min"]
RATE_WINDOW_S = 60.0
COUNTS_TTL_S = 1.0
JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0,
               12 * 3600.0, 86400.0, 7 * 86400.0)


class JobSeries:
    """Job counts for the sampler (one grouped query, shared for ``COUNTS_TTL_S``)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, int]] | None = None
        self._history: deque[tuple[float, int, int]] = deque()  # (t, completed, failed)

    def counts(self, max_age_s: float = COUNTS_TTL_S) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] > max_age_s:
                self._cached = (now, job_state_counts(self.store))
            return dict(self._cached[1])

    def source(self, now: float) -> dict[str, float]:
        counts = self.counts(max_age_s=0.0)
        completed, failed = counts["completed"], counts["failed"]
        with self._lock:
            history = self._history
            history.append((now, completed, failed))
            while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_S:
                history.popleft()
            then, completed0, failed0 = history[0]
        span = now - then
        values = {"jobs_queued": float(counts["queued"]),
                  "jobs_running": float(counts["running"]),
                  "jobs_held": float(counts["held"]),
                  "jobs_completed_per_min": 0.0, "jobs_failed_per_min": 0.0}
        if span > 0:
            # Over less than a minute of history the growth itself is the best estimate.
            scale = 60.0 / max(span, RATE_WINDOW_S)
            values["jobs_completed_per_min"] = max(0, completed - completed0) * scale
            values["jobs_failed_per_min"] = max(0, failed - failed0) * scale
        return values


class JobCollector(Collector):
    """Jobs in ``/metrics`` (see the module docstring)."""

    def __init__(self, store: Store, series: JobSeries) -> None:
        self.store = store
        self.series = series

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterable[Metric]:
        counts = self.series.counts(max_age_s=0.0)  # a scrape reads the store's state now
        jobs = GaugeMetricFamily("xcloud_jobs", "Batch jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], float(counts.get(state.value, 0)))
        yield jobs
        ended = attempts_ended_by_kind(self.store)
        attempts = CounterMetricFamily("xcloud_job_attempts_ended",
                                       "Job attempts that ended, by how they ended",
                                       labels=["kind"])
        for kind in sorted(k.value for k in ENDINGS):
            attempts.add_metric([kind], float(ended.get(kind, 0)))
        yield attempts
        durations = HistogramMetricFamily(
            "xcloud_job_duration_seconds",
            "Time from submission to the end of ended jobs, by final state",
            labels=["state"])
        buckets = job_duration_buckets(self.store, JOB_BUCKETS)
        for name in sorted(s.value for s in TERMINAL):
            cumulative, count, total = buckets.get(name, ([0] * len(JOB_BUCKETS), 0, 0.0))
            pairs = [(_bound(b), float(c)) for b, c in zip(JOB_BUCKETS, cumulative,
                                                            strict=True)]
            pairs.append(("+Inf", float(count)))
            durations.add_metric([name], pairs, sum_value=total)
        yield durations


def _bound(value: float) -> str:
    return str(float(value))
