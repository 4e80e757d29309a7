"""The worker's GPU allocator: which of its GPUs each job attempt gets (docs/gpus.md).

The coordinator only counts GPUs per worker; the worker picks the devices, since only
it knows which are free. On ``job.assign`` with ``resources.gpus`` N the runner takes N
free GPUs that meet the job's ``resources.gpu_memory_bytes`` and ``requirements.gpu_name``
(or refuses ``busy``); the command then sees them in ``CUDA_VISIBLE_DEVICES`` and
``NVIDIA_VISIBLE_DEVICES`` (uuids where the driver gave them all, else indexes: CUDA's own
numbering may differ from the driver's, uuids do not), and a docker container gets a
device request for them.

A GPU is free again once its attempt no longer holds a slot (``holder_live`` says so):
the allocator asks at each ``take`` rather than being told, so an attempt that ends by
any path (finished, killed, dropped at stop) cannot leak its GPUs. A worker that restarts
drops its unfinished attempts, and with them every allocation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from worker.executors.base import SessionSpec
from worker.gpu_sources import MAX_GPUS, GpuInfo
from worker.gpus import detect_gpus

log = logging.getLogger(__name__)

#: How long a detected inventory is reused before GPU assignments detect again.
INVENTORY_TTL_S = 60.0
MAX_GPU_NAME = 64


@dataclass(frozen=True, slots=True)
class GpuAsk:
    """What a JobSpec asks of this worker's GPUs."""

    count: int = 0
    memory_bytes: int | None = None
    name: str | None = None

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> GpuAsk:
        """``resources.gpus``/``gpu_memory_bytes`` and ``requirements.gpu_name`` (the schema
        bounded them; read defensively all the same)."""
        resources = spec.get("resources") or {}
        requirements = spec.get("requirements") or {}
        if not isinstance(resources, Mapping) or not isinstance(requirements, Mapping):
            return cls()
        count, memory = resources.get("gpus"), resources.get("gpu_memory_bytes")
        name = requirements.get("gpu_name")
        return cls(count=max(0, min(MAX_GPUS, count)) if _is_int(count) else 0,
                   memory_bytes=memory if _is_int(memory) and memory > 0 else None,
                   name=name[:MAX_GPU_NAME] if isinstance(name, str) and name else None)

    def matches(self, gpu: GpuInfo) -> bool:
        if self.memory_bytes and (gpu.memory_bytes is None
                                  or gpu.memory_bytes < self.memory_bytes):
            return False
        return not self.name or (gpu.name is not None
                                 and self.name.casefold() in gpu.name.casefold())


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def device_ids(gpus: Sequence[GpuInfo]) -> list[str]:
    """How the GPUs are named to CUDA and docker: all uuids when every one has its uuid,
    else the driver's indexes."""
    if gpus and all(g.uuid for g in gpus):
        return [str(g.uuid) for g in gpus]
    return [str(g.index) for g in gpus]


def gpu_env(gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """The environment that hands ``gpus`` to a process (nothing for no GPUs)."""
    if not gpus:
        return {}
    ids = ",".join(device_ids(gpus))
    return {"CUDA_VISIBLE_DEVICES": ids, "NVIDIA_VISIBLE_DEVICES": ids}


class GpuAllocator:
    """This worker's GPUs and which attempt holds which (thread-safe).

    ``inventory`` lists the GPUs (default: the process's probe, ``detect_gpus``); it is
    called on the first GPU assignment and again once the last result is older than
    ``ttl_s``, never for jobs without GPUs. ``holder_live(holder)`` says whether a holder
    (an attempt id) still holds its GPUs.
    """

    def __init__(self, inventory: Callable[[], Sequence[GpuInfo]] = detect_gpus, *,
                 holder_live: Callable[[str], bool] = lambda _holder: True,
                 ttl_s: float = INVENTORY_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inventory = inventory
        self.holder_live = holder_live
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._gpus: tuple[GpuInfo, ...] = ()
        self._detected_at: float | None = None
        self._held: dict[str, tuple[GpuInfo, ...]] = {}  # holder -> its GPUs

    def gpus(self) -> list[GpuInfo]:
        """The GPUs (detected at most every ``ttl_s``)."""
        with self._lock:
            at = self._detected_at
            if at is not None and self._clock() - at < self.ttl_s:
                return list(self._gpus)
        found = tuple(self.inventory())[:MAX_GPUS]  # bounded in time by the probe
        with self._lock:
            self._gpus, self._detected_at = found, self._clock()
            return list(found)

    def take(self, holder: str, ask: GpuAsk) -> list[GpuInfo] | None:
        """``ask.count`` free GPUs meeting the ask for ``holder`` (lowest indexes first);
        [] for an ask of none; None when there are not enough free ones."""
        if ask.count <= 0:
            return []
        gpus = self.gpus()
        with self._lock:
            for other in [h for h in self._held if h != holder]:
                if not self.holder_live(other):
                    del self._held[other]
            if holder in self._held:
                return list(self._held[holder])
            busy = {g.index for held in self._held.values() for g in held}
            free = [g for g in gpus if g.index not in busy and ask.matches(g)]
            if len(free) < ask.count:
                log.info("no %d free GPU(s) for %s: %d of %d match and are free", ask.count,
                         holder, len(free), len(gpus))
                return None
            chosen = tuple(free[:ask.count])
            self._held[holder] = chosen
        log.info("%s gets GPU(s) %s", holder, ", ".join(device_ids(chosen)))
        return list(chosen)

    def held(self, holder: str) -> list[GpuInfo]:
        """The GPUs ``holder`` was given ([] when none)."""
        with self._lock:
            return list(self._held.get(holder, ()))

    def release(self, holder: str) -> None:
        with self._lock:
            self._held.pop(holder, None)

    def in_use(self) -> int:
        """GPUs held by live holders."""
        with self._lock:
            holders = list(self._held.items())
        return sum(len(gpus) for holder, gpus in holders if self.holder_live(holder))


@dataclass(frozen=True)
class GpuSessionSpec(SessionSpec):
    """A session whose container drivers hand it these devices (docker: a device
    request); ``gpu_devices`` as ``device_ids`` names them. Process sessions ignore it:
    their commands get ``gpu_env``."""

    gpu_devices: tuple[str, ...] = ()
