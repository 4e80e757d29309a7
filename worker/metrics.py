"""Cheap live metrics for each heartbeat (collectd's role in xCloud).

Each sample reads a handful of /proc files and one statvfs: well under a millisecond,
so a heartbeat every few seconds costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import psutil

from schemas.messages import WorkerHeartbeat
from worker.caps import existing_dir
from worker.gpus import sample_gpus

log = logging.getLogger(__name__)


def _busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds; guest time is already counted in user/nice on Linux."""
    total = float(sum(times))
    total -= float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    idle = float(times.idle) + float(getattr(times, "iowait", 0.0))
    return total - idle, total


class MetricsSampler:
    """Samples system-wide metrics between consecutive heartbeats of one worker.

    CPU percent is computed from this sampler's own previous reading (not psutil's
    module-global one), so several agents or a coordinator in one process do not
    skew each other's numbers; it is primed at construction.
    """

    def __init__(self, wid: str, state_dir: Path | str) -> None:
        self.wid = wid
        self.state_dir = Path(state_dir)
        self._last_cpu = _busy_total(psutil.cpu_times())

    def cpu_percent(self) -> float:
        """System CPU use since the previous call, 0–100 (all cores together)."""
        busy, total = _busy_total(psutil.cpu_times())
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        d_total = total - last_total
        if d_total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, (busy - last_busy) / d_total * 100.0)), 1)

    def sample(
        self,
        seq: int,
        interval_s: float,
        free_slots: int,
        running: list[dict[str, str]] | None = None,
        attempts: list[str] | None = None,
    ) -> WorkerHeartbeat:
        mem = psutil.virtual_memory()
        load1 = load5 = load15 = None
        with contextlib.suppress(OSError, AttributeError):
            load1, load5, load15 = (round(x, 2) for x in os.getloadavg())
        disk_free = None
        with contextlib.suppress(OSError):
            disk_free = int(psutil.disk_usage(str(existing_dir(self.state_dir))).free)
        sent = recv = None
        try:
            net = psutil.net_io_counters()
            if net is not None:
                sent, recv = int(net.bytes_sent), int(net.bytes_recv)
        except (OSError, RuntimeError):
            pass
        return WorkerHeartbeat(
            wid=self.wid,
            seq=seq,
            interval_s=interval_s,
            cpu_percent=self.cpu_percent(),
            load1=load1,
            load5=load5,
            load15=load15,
            mem_used_bytes=int(mem.used),
            mem_available_bytes=int(mem.available),
            disk_free_bytes=disk_free,
            net_sent_bytes=sent,
            net_recv_bytes=recv,
            free_slots=max(0, free_slots),
            running=list(running or []),
            gpus=[use.to_wire() for use in sample_gpus()] or None,
            attempts=list(attempts) if attempts is not None else None,
        )
