"""What ``/metrics`` exports, with the ``prometheus_client`` library.

Two registries:
- ``coordinator.monitoring.instruments.PROCESS``: request latency per message type,
  observed by ``coordinator.handling.guarded``. It counts every coordinator in the
  process (one in production; tests run several).
- one per coordinator (``coordinator_registry``): the grid (``GridCollector``: workers by
  state, slots, reservations, exec sessions, heartbeats written, and per-worker gauges)
  and exec durations (``ExecDurations``, fed from the audit trail by the monitoring pass).

Label sets are bounded: ``state`` and ``outcome`` are enums, ``type`` is a message type
(the codec refuses unknown ones before a handler runs), ``worker`` is the id of a *live*
worker (bounded by the grid; ``[monitoring] per_worker_metrics = false`` drops them for
grids too big to scrape) and ``gpu`` an index below 16. No reservation, exec or job ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.monitoring.grid_series import GridSampler, RunningWork
from coordinator.monitoring.instruments import PROCESS
from coordinator.store import Store
from coordinator.worker_state import LIVE_STATES, WorkerState

log = logging.getLogger(__name__)

EXEC_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
                14400.0)
MAX_WORKER_SERIES = 20_000  # per-worker gauges beyond this many workers are left out
MAX_GPUS = 16
GPU_INDEXES = range(MAX_GPUS)  # the label's whole set


def exec_outcome(exit_code: Any, signal: Any, timed_out: Any, error: Any) -> str:
    """One word for how a remote command ended (a bounded label)."""
    if error:
        return "error"
    if timed_out:
        return "timed_out"
    if signal:
        return "signalled"
    return "ok" if exit_code == 0 else "failed"


class ExecDurations:
    """Exec durations, from the rows the audit writer committed (``exec.report``s)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "xcloud_exec_duration_seconds",
            "Run time of remote commands reported to the audit trail, by outcome",
            ["outcome"], registry=registry, buckets=EXEC_BUCKETS)

    def observe(self, rows: Iterable[Sequence[Any]]) -> None:
        """Rows of ``Store.exec_reports_after``."""
        for _id, duration, exit_code, signal, timed_out, error in rows:
            if duration is None or duration < 0:
                continue
            label = exec_outcome(exit_code, signal, timed_out, error)
            self.histogram.labels(label).observe(float(duration))


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class GridCollector(Collector):
    """Reads the grid at scrape time (one snapshot shared with the other consumers)."""

    def __init__(self, store: Store, sampler: GridSampler, running: RunningWork, *,
                 heartbeats_total: Callable[[], int], per_worker: bool) -> None:
        self.store = store
        self.sampler = sampler
        self.running = running
        self.heartbeats_total = heartbeats_total
        self.per_worker = per_worker

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterable[Metric]:
        snap = self.sampler.snapshot()
        workers = GaugeMetricFamily("xcloud_workers", "Workers by state", labels=["state"])
        for state in WorkerState:
            workers.add_metric([state.value], snap.get(f"workers_{state.value}", 0.0))
        yield workers
        slots = GaugeMetricFamily("xcloud_slots", "Work slots of live workers",
                                  labels=["kind"])
        slots.add_metric(["total"], snap.get("slots_total", 0.0))
        slots.add_metric(["busy"], snap.get("slots_busy", 0.0))
        yield slots
        yield GaugeMetricFamily("xcloud_reservations", "Live reservations (opening or active)",
                                value=snap.get("reservations", 0.0))
        yield GaugeMetricFamily("xcloud_exec_sessions",
                                "Remote commands running, as the workers' heartbeats say",
                                value=snap.get("exec_sessions", 0.0))
        yield CounterMetricFamily("xcloud_heartbeats", "Worker heartbeats written",
                                  value=float(self.heartbeats_total()))
        if self.per_worker:
            yield from self._per_worker()

    def _per_worker(self) -> Iterable[Metric]:
        rows = self.store.live_worker_metrics(sorted(s.value for s in LIVE_STATES),
                                              MAX_WORKER_SERIES)
        gauges = {
            "cpu_percent": GaugeMetricFamily("xcloud_worker_cpu_percent",
                                             "CPU use of a live worker (all cores, 0-100)",
                                             labels=["worker"]),
            "load1": GaugeMetricFamily("xcloud_worker_load1", "1-minute load average",
                                       labels=["worker"]),
            "mem_used_bytes": GaugeMetricFamily("xcloud_worker_memory_used_bytes",
                                                "Memory in use", labels=["worker"]),
            "mem_available_bytes": GaugeMetricFamily("xcloud_worker_memory_available_bytes",
                                                     "Memory available", labels=["worker"]),
            "disk_free_bytes": GaugeMetricFamily("xcloud_worker_disk_free_bytes",
                                                 "Free disk in the worker's state directory",
                                                 labels=["worker"]),
        }
        counters = {
            "net_recv_bytes": CounterMetricFamily("xcloud_worker_network_receive_bytes",
                                                  "Bytes received (host counter)",
                                                  labels=["worker"]),
            "net_sent_bytes": CounterMetricFamily("xcloud_worker_network_transmit_bytes",
                                                  "Bytes sent (host counter)",
                                                  labels=["worker"]),
        }
        slots = GaugeMetricFamily("xcloud_worker_slots", "Work slots of a live worker",
                                  labels=["worker", "kind"])
        execs = GaugeMetricFamily("xcloud_worker_exec_sessions", "Remote commands running",
                                  labels=["worker"])
        gpu_util = GaugeMetricFamily("xcloud_worker_gpu_utilization_percent",
                                     "GPU utilisation", labels=["worker", "gpu"])
        gpu_mem = GaugeMetricFamily("xcloud_worker_gpu_memory_used_bytes", "GPU memory in use",
                                    labels=["worker", "gpu"])
        for wid, n_slots, free, text in rows:
            try:
                metrics = json.loads(text) if text else {}
            except ValueError:
                metrics = {}
            if not isinstance(metrics, dict):
                metrics = {}
            for key, gauge in gauges.items():
                value = _number(metrics.get(key))
                if value is not None:
                    gauge.add_metric([wid], value)
            for key, counter in counters.items():
                value = _number(metrics.get(key))
                if value is not None:
                    counter.add_metric([wid], value)
            slots.add_metric([wid, "total"], float(n_slots))
            slots.add_metric([wid, "busy"], float(max(0, n_slots - free)))
            execs.add_metric([wid], float(self.running.execs(wid)))
            gpus = metrics.get("gpus")
            for gpu in (gpus if isinstance(gpus, list) else [])[:MAX_GPUS]:
                if not isinstance(gpu, dict) or gpu.get("index") not in GPU_INDEXES:
                    continue
                index = str(gpu["index"])
                for key, family in (("util_percent", gpu_util),
                                    ("memory_used_bytes", gpu_mem)):
                    value = _number(gpu.get(key))
                    if value is not None:
                        family.add_metric([wid, index], value)
        yield from gauges.values()
        yield from counters.values()
        yield from (slots, execs, gpu_util, gpu_mem)


class _ProcessMetrics(Collector):
    """The process-wide registry, re-exported by each coordinator's registry."""

    def collect(self) -> Iterable[Metric]:
        return PROCESS.collect()

    def describe(self) -> list[Metric]:
        return []


def coordinator_registry(collector: GridCollector, *more: Collector
                         ) -> tuple[CollectorRegistry, ExecDurations]:
    """A registry for one coordinator's ``/metrics`` (the grid, then ``more`` collectors:
    the jobs'), and its exec-duration histogram."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for extra in more:
        registry.register(extra)
    registry.register(_ProcessMetrics())
    return registry, ExecDurations(registry)
