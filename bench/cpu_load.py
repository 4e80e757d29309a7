"""CPU measurement, and the load of the machine around it.

The CPU seconds of a process, a process tree or each thread of this process over a
window (per call, with ``CpuMeters``); the whole machine's busy time; and how much of
the machine *other* processes used meanwhile (``LoadMonitor``, ``wait_for_quiet``):
other jobs on a small machine skew every number, so each report says how busy it was.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import psutil


class CpuMeter:
    """CPU seconds (user+system) a process spent between ``start()`` and ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._t0 = 0.0
        self._c0 = 0.0

    def _cpu(self) -> float:
        times = self.proc.cpu_times()
        return float(times.user + times.system)

    def start(self) -> CpuMeter:
        self._t0, self._c0 = time.monotonic(), self._cpu()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        cpu = self._cpu() - self._c0
        return {"cpu_s": cpu, "wall_s": wall, "cpu_pct": 100.0 * cpu / wall if wall else 0.0}


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by thread name (same names summed)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, f"tid-{th.id}")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


def process_cpu(pid: int, tree: bool = False) -> Callable[[], float]:
    """CPU seconds of ``pid`` (with ``tree``, plus its live descendants), reaped
    children included."""
    proc = psutil.Process(pid)

    def cpu() -> float:
        total = 0.0
        for p in [proc, *(proc.children(recursive=True) if tree else [])]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    return cpu


def reaped_children_cpu() -> float:
    """CPU seconds of the children this process has reaped (``subprocess.run`` ones)."""
    t = os.times()
    return float(t.children_user + t.children_system)


class CpuMeters:
    """CPU seconds of named sources over a window, per call."""

    def __init__(self, sources: dict[str, Callable[[], float]]) -> None:
        self.sources = sources
        self._c0: dict[str, float] = {}

    @classmethod
    def of_pids(cls, pids: dict[str, int]) -> CpuMeters:
        sources = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                sources[name] = process_cpu(pid)
        return cls(sources)

    def start(self) -> CpuMeters:
        self._c0 = {}
        for name, cpu in self.sources.items():
            with contextlib.suppress(psutil.Error):
                self._c0[name] = cpu()
        return self

    def per_call_ms(self, calls: int) -> dict[str, float]:
        out = {}
        for name, cpu in self.sources.items():
            with contextlib.suppress(psutil.Error, KeyError):
                out[name] = 1000.0 * (cpu() - self._c0[name]) / max(1, calls)
        return out


class LoadMonitor:
    """How much of the machine *other* processes used while a benchmark ran.

    System-wide busy CPU time (psutil) minus this process tree's CPU time (itself, its
    reaped children via ``os.times()``, and live descendants), as % of all cores.
    """

    def __init__(self) -> None:
        self._t0 = 0.0
        self._busy0 = 0.0
        self._ours0 = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        return float(sum(t) - idle)

    @staticmethod
    def _ours() -> float:
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)

    def start(self) -> LoadMonitor:
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        cores = psutil.cpu_count() or 1
        busy = self._busy() - self._busy0
        ours = self._ours() - self._ours0
        return {"wall_s": wall,
                "ours_pct": 100.0 * ours / (wall * cores) if wall else 0.0,
                "others_pct": max(0.0, 100.0 * (busy - ours) / (wall * cores)) if wall else 0.0}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core; idle and iowait not
    counted): its difference over a run, divided by the jobs, is what each job cost."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def background_cpu_pct(interval: float = 1.0) -> float:
    """System-wide CPU use over ``interval`` (all cores = 100) while we are idle."""
    return float(psutil.cpu_percent(interval=interval))


def wait_for_quiet(max_wait: float = 60.0, threshold: float = 15.0) -> float:
    """Wait (bounded) until the machine is nearly idle; return the last CPU reading.

    Other jobs on a 2-core machine skew every number here, so the runner waits for a
    quiet moment and records what it saw.
    """
    deadline = time.monotonic() + max_wait
    busy = background_cpu_pct(1.0)
    while busy > threshold and time.monotonic() < deadline:
        busy = background_cpu_pct(1.0)
    return busy
