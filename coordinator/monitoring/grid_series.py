"""Grid-wide series: what the whole grid looks like at one instant.

``GridSampler.snapshot()`` is read by three consumers: the monitoring pass stores it as
the grid-wide time series (``xc_grid_metric``, every ``rollup_s``), ``/metrics`` exports
it, and the dashboard's overview shows it. Its sources are a list of functions, each
returning ``{series name: value}``; the set of names is fixed by the code (bounded), and
``SERIES`` declares them for the API.

Batch jobs add one source (``coordinator.monitoring.job_metrics.JobSeries.source``,
appended by ``MonitoringService``) and its names (``JOB_SERIES``) to ``SERIES``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.monitoring.job_metrics import JOB_SERIES
from coordinator.store import Store
from coordinator.worker_state import LIVE_STATES, WorkerState

SeriesSource = Callable[[float], Mapping[str, float]]

RUNNING_TTL_S = 60.0  # a worker's running work counts this long after its last heartbeat
SNAPSHOT_TTL_S = 1.0  # concurrent readers within this share one snapshot
RATE_WINDOW_S = 30.0  # the heartbeat rate is averaged over about this long

SERIES: list[str] = [
    *(f"workers_{state.value}" for state in WorkerState),
    "slots_total",
    "slots_busy",
    "reservations",
    "exec_sessions",
    "heartbeats_per_s",
    *JOB_SERIES,
]


class RunningWork:
    """What each worker says it runs, from its latest heartbeat (a heartbeat listener of
    the registry: cheap, in memory, after the batch is written)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._by_worker: dict[str, tuple[int, int, float]] = {}  # wid -> (execs, sessions, at)

    def on_heartbeat(self, wid: str, running: list[dict[str, Any]]) -> None:
        execs = sum(1 for item in running if isinstance(item, dict) and item.get("kind") == "exec")
        sessions = sum(1 for item in running
                       if isinstance(item, dict) and item.get("kind") == "reservation")
        with self._lock:
            self._by_worker[wid] = (execs, sessions, self._clock())

    def execs(self, wid: str) -> int:
        with self._lock:
            entry = self._by_worker.get(wid)
        if entry is None or self._clock() - entry[2] > RUNNING_TTL_S:
            return 0
        return entry[0]

    def total_execs(self) -> int:
        now = self._clock()
        with self._lock:
            stale = [w for w, e in self._by_worker.items() if now - e[2] > RUNNING_TTL_S]
            for wid in stale:
                del self._by_worker[wid]
            return sum(e[0] for e in self._by_worker.values())


class GridSampler:
    """The grid-wide values of this instant (see the module docstring)."""

    def __init__(self, store: Store, *, heartbeats_total: Callable[[], int],
                 running: RunningWork, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.running = running
        self._heartbeats_total = heartbeats_total
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, float]] | None = None
        self._rate_history: deque[tuple[float, int]] = deque()
        self.sources: list[SeriesSource] = [self._workers, self._reservations, self._work,
                                            self._heartbeats]

    def snapshot(self, max_age_s: float = SNAPSHOT_TTL_S) -> dict[str, float]:
        """Every series' current value (shared by callers within ``max_age_s``)."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] <= max_age_s:
                return dict(self._cached[1])
            values: dict[str, float] = {}
            for source in self.sources:
                values.update(source(now))
            self._cached = (now, values)
            return dict(values)

    def _workers(self, _now: float) -> dict[str, float]:
        values: dict[str, float] = {f"workers_{s.value}": 0.0 for s in WorkerState}
        total = busy = 0
        live = {s.value for s in LIVE_STATES}
        for state, count, slots, free in self.store.worker_state_totals():
            values[f"workers_{state}"] = float(count)
            if state in live:
                total += slots
                busy += max(0, slots - free)
        values["slots_total"] = float(total)
        values["slots_busy"] = float(busy)
        return values

    def _reservations(self, _now: float) -> dict[str, float]:
        return {"reservations": float(sum(self.store.live_reservation_counts().values()))}

    def _work(self, _now: float) -> dict[str, float]:
        return {"exec_sessions": float(self.running.total_execs())}

    def _heartbeats(self, now: float) -> dict[str, float]:
        """Heartbeats written per second over about the last ``RATE_WINDOW_S``."""
        total = self._heartbeats_total()
        history = self._rate_history
        history.append((now, total))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_S:
            history.popleft()
        then, before = history[0]
        if now <= then or total < before:
            return {"heartbeats_per_s": 0.0}
        return {"heartbeats_per_s": (total - before) / (now - then)}
