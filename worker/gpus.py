"""NVIDIA GPUs of this machine: what they are (for worker.caps) and how busy (heartbeats).

Two sources, in this order (docs/gpus.md; the sources are in ``worker.gpu_sources``):

1. NVML through the optional ``nvidia-ml-py`` package (module ``pynvml``, the extra
   ``xcloud[gpu]``), when it imports and a driver answers ``nvmlInit``;
2. ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` when the binary is on
   PATH;
3. else no GPUs.

A GPU driver can hang (a GPU fallen off the bus blocks NVML calls and nvidia-smi for
minutes), so every query runs on a thread of its own with a deadline: a caller gets an
answer in bounded time and never an exception. A broken driver reads as "no GPUs" plus
one log line. Everything reported is bounded (16 GPUs, capped strings), matching
worker.caps' and worker.heartbeat's ``gpus`` fields.

Standard library only, on purpose: ``scripts/gpu-check`` runs this module with a bare
``python3`` on a GPU machine that has no virtualenv.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.gpu_sources import (
    DETECT_TIMEOUT_S,
    INVENTORY_FIELDS,
    MAX_GPUS,
    USAGE_FIELDS,
    GpuInfo,
    GpuSource,
    GpuUnavailable,
    GpuUsage,
    NvidiaSmi,
    Nvml,
    parse_query_csv,
)

__all__ = [
    "DETECT_TIMEOUT_S", "INVENTORY_FIELDS", "MAX_GPUS", "SAMPLE_WAIT_S", "STALE_AFTER_S",
    "USAGE_FIELDS", "GpuInfo", "GpuProbe", "GpuUnavailable", "GpuUsage", "detect_gpus",
    "parse_query_csv", "sample_gpus", "shared_probe",
]

log = logging.getLogger(__name__)

#: How long a heartbeat waits for a fresh sample before reusing the last one.
SAMPLE_WAIT_S = 1.0
#: A last sample older than this is dropped rather than reported as current.
STALE_AFTER_S = 60.0
#: Beyond ``timeout_s``, how long a detection may take before it counts as hung (a
#: timed-out nvidia-smi is killed and reaped within this, and reported as timed out).
GRACE_S = 3.0


# ------------------------------------------------------------------------------- probe


@dataclass
class _Detection:
    """What one detection run found: the source that answered (None: no GPUs)."""

    deadline: float
    source: GpuSource | None = None
    gpus: tuple[GpuInfo, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Pending:
    thread: threading.Thread
    result: _Detection


class GpuProbe:
    """This machine's GPUs, detected and sampled with deadlines, never raising.

    ``detect()`` re-queries each call (caps are collected at start, on every reconnect
    and on caps.refresh) and remembers which source answered; ``usage()`` samples that
    source on a thread of its own, waits at most ``sample_wait_s`` for it and otherwise
    returns the last sample (dropped once older than ``stale_after_s``); while a query
    hangs no second one is started. ``close()`` releases NVML.
    """

    def __init__(
        self,
        *,
        nvidia_smi: str = "nvidia-smi",
        use_nvml: bool = True,
        timeout_s: float = DETECT_TIMEOUT_S,
        sample_wait_s: float = SAMPLE_WAIT_S,
        stale_after_s: float = STALE_AFTER_S,
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvidia_smi = nvidia_smi
        self.use_nvml = use_nvml
        self.timeout_s = timeout_s
        self.sample_wait_s = sample_wait_s
        self.stale_after_s = stale_after_s
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: Nvml | None = None
        self._source: GpuSource | None = None
        self._detecting: _Pending | None = None
        self._sampling: threading.Thread | None = None
        self._last_usage: tuple[GpuUsage, ...] = ()
        self._last_usage_at: float | None = None
        self._logged: set[str] = set()

    @property
    def source(self) -> str | None:
        """``"nvml"``, ``"nvidia-smi"`` or None: what answered the last detection."""
        source = self._source
        return source.name if source is not None else None

    # -- logging: one line per distinct problem ----------------------------------------

    def _say(self, level: int, message: str) -> None:
        """Log ``message`` once at ``level``; repeats (every reconnect) go to debug."""
        with self._lock:
            first = message not in self._logged
            if first and len(self._logged) < 64:
                self._logged.add(message)
        log.log(level if first else logging.DEBUG, "%s", message)

    # -- detection -----------------------------------------------------------------

    def detect(self) -> list[GpuInfo]:
        """The GPUs, lowest indexes first (at most MAX_GPUS); [] when there are none or
        the driver is broken or hung. Waits at most about ``timeout_s``."""
        try:
            return self._detect()
        except Exception as err:  # never into the caller
            self._say(logging.WARNING, f"GPU detection failed: {err}; reporting no GPUs")
            return []

    def _detect(self) -> list[GpuInfo]:
        """Joins the detection in flight (a concurrent caller's) or starts one; waits
        until its deadline."""
        with self._lock:
            pending = self._detecting
            if pending is None or not pending.thread.is_alive():
                result = _Detection(deadline=time.monotonic() + self.timeout_s + self.grace_s)
                pending = self._detecting = _Pending(
                    threading.Thread(target=self._detect_into, args=(result,),
                                     name="xcloud-gpu-detect", daemon=True), result)
                pending.thread.start()
        result = pending.result
        pending.thread.join(max(0.0, result.deadline - time.monotonic()))
        if pending.thread.is_alive():
            self._set_source(None)
            self._say(logging.WARNING, f"GPU detection did not finish within "
                                       f"{self.timeout_s:g} s (hung driver?); reporting "
                                       "no GPUs")
            return []
        self._set_source(result.source if result.gpus else None)  # none: nothing to sample
        if result.problems:
            outcome = (f"using {result.source.name}" if result.source is not None
                       else "reporting no GPUs")
            self._say(logging.WARNING if result.source is None else logging.INFO,
                      "GPU detection: " + "; ".join(result.problems) + f"; {outcome}")
        if result.gpus:
            assert result.source is not None
            names = sorted({g.name or "?" for g in result.gpus})
            self._say(logging.INFO, f"{len(result.gpus)} GPU(s) through "
                                    f"{result.source.name}: {', '.join(names)}")
        return list(result.gpus)

    def _detect_into(self, result: _Detection) -> None:
        """Runs on the detection thread: NVML, else nvidia-smi, else nothing."""
        problems: list[str] = []
        try:
            try:
                nvml = self._nvml_source() if self.use_nvml else None
            except Exception as err:  # a broken nvidia-ml-py install
                problems.append(f"the pynvml module does not import: {_describe(err)}")
                nvml = None
            if nvml is not None:
                try:
                    result.gpus = tuple(nvml.inventory())
                    result.source = nvml
                    return
                except Exception as err:
                    nvml.close()
                    if _library_missing(err):  # nvidia-ml-py without a driver: no GPUs
                        log.debug("NVML: %s", err)
                    else:
                        problems.append(f"NVML: {_describe(err)}")
            path = shutil.which(self.nvidia_smi)
            if path is None:  # no NVIDIA driver installed: the common case, not a problem
                return
            smi = NvidiaSmi(path, self.timeout_s)
            try:
                result.gpus = tuple(smi.inventory())
                result.source = smi
            except Exception as err:
                problems.append(f"nvidia-smi: {_describe(err)}")
        except Exception as err:
            problems.append(_describe(err))
        finally:
            result.problems = tuple(problems)

    def _nvml_source(self) -> Nvml | None:
        """The probe's NVML source, imported on first use (outside the lock: an import
        may be slow, and heartbeats take the lock)."""
        with self._lock:
            if self._nvml is not None:
                return self._nvml
        loaded = Nvml.load()
        with self._lock:
            if self._nvml is None:
                self._nvml = loaded
            return self._nvml

    def _set_source(self, source: GpuSource | None) -> None:
        with self._lock:
            if source is not self._source:
                self._source = source
                self._last_usage, self._last_usage_at = (), None

    # -- sampling ------------------------------------------------------------------

    def usage(self, wait_s: float | None = None) -> list[GpuUsage]:
        """Current use of the detected GPUs ([] when none were detected).

        Starts one sample unless one is still running, waits for it at most ``wait_s``
        (default ``sample_wait_s``), then returns the newest sample not older than
        ``stale_after_s``: a late or hung sample means the previous one is reused.
        """
        try:
            with self._lock:
                source = self._source
                if source is None:
                    return []
                thread = self._sampling
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=self._sample_into, args=(source,),
                                              name="xcloud-gpu-sample", daemon=True)
                    self._sampling = thread
                    thread.start()
            thread.join(max(0.0, self.sample_wait_s if wait_s is None else wait_s))
            with self._lock:
                at = self._last_usage_at
                if at is None or self._clock() - at > self.stale_after_s:
                    return []
                return list(self._last_usage)
        except Exception as err:  # never into the heartbeat
            self._say(logging.WARNING, f"GPU sampling failed: {err}")
            return []

    def _sample_into(self, source: GpuSource) -> None:
        try:
            sample = tuple(source.usage())
        except Exception as err:
            self._say(logging.WARNING, f"GPU sample from {source.name} failed: "
                                       f"{_describe(err)}; reusing the last one")
            return
        with self._lock:
            if self._source is source:  # a detection since may have changed the source
                self._last_usage, self._last_usage_at = sample, self._clock()

    # -- end -----------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded) for running queries, then release NVML unless one is hung."""
        deadline = time.monotonic() + (self.timeout_s + self.grace_s if timeout is None
                                       else timeout)
        with self._lock:
            detecting = self._detecting.thread if self._detecting is not None else None
            threads = [t for t in (detecting, self._sampling) if t is not None]
            nvml = self._nvml
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if nvml is not None and not any(t.is_alive() for t in threads):
            nvml.close()


def _library_missing(err: BaseException) -> bool:
    """pynvml's NVMLError_LibraryNotFound: the package is installed, no driver is."""
    return "LibraryNotFound" in type(err).__name__ or "Library Not Found" in str(err)


def _describe(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text[:300]


# ------------------------------------------------------------------ process-wide probe

_shared_probe: GpuProbe | None = None
_shared_lock = threading.Lock()


def shared_probe() -> GpuProbe:
    """The process's probe (created on first use: nothing runs at import). GPUs belong to
    the machine, so several agents in one process share it."""
    global _shared_probe
    with _shared_lock:
        if _shared_probe is None:
            _shared_probe = GpuProbe()
        return _shared_probe


def detect_gpus() -> list[GpuInfo]:
    """This machine's GPUs for worker.caps; never raises, bounded in time."""
    return shared_probe().detect()


def sample_gpus() -> list[GpuUsage]:
    """GPU use for a heartbeat (after ``detect_gpus``); never raises, waits at most
    ``SAMPLE_WAIT_S``."""
    return shared_probe().usage()
