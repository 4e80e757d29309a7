"""GPU asks and GPU capacity (docs/gpus.md, "Scheduling").

A job asks ``resources.gpus`` (a count), optionally ``resources.gpu_memory_bytes`` (a
minimum per GPU) and ``requirements.gpu_name`` (a case-insensitive substring of the GPU's
name); a reservation asks the same in ``any`` (``gpus``, ``gpu_memory_bytes``,
``gpu_name``). The coordinator only *counts*: a worker's GPUs are those of its caps that
meet the memory and name asks, and those its live attempts hold are subtracted. Which
devices an attempt gets is the worker's choice (worker/job_gpus.py), since only it knows
which of its GPUs are free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_GPUS = 16  # worker.caps lists at most this many; a job asks at most this many
MAX_GPU_NAME = 64  # requirements.gpu_name


@dataclass(frozen=True, slots=True)
class GpuAsk:
    """What one job or reservation asks of a worker's GPUs."""

    count: int = 0
    memory_bytes: int | None = None  # a minimum per GPU
    name: str | None = None  # a case-insensitive substring of the GPU's name

    @property
    def filtered(self) -> bool:
        """Whether it restricts which GPUs count (memory or name)."""
        return bool(self.memory_bytes) or bool(self.name)

    def describe(self) -> str:
        """``2 GPU(s) with >= 40 GiB named ~H100`` for refusals."""
        text = f"{self.count} GPU(s)" if self.count else "a GPU"
        if self.memory_bytes:
            text += f" with at least {self.memory_bytes / 2**30:g} GiB"
        if self.name:
            text += f" named like {self.name!r}"
        return text


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def job_ask(spec: Mapping[str, Any]) -> GpuAsk:
    """The GPU ask of a JobSpec (validated by its schema; read defensively anyway)."""
    resources = spec.get("resources") or {}
    requirements = spec.get("requirements") or {}
    if not isinstance(resources, Mapping) or not isinstance(requirements, Mapping):
        return GpuAsk()
    name = requirements.get("gpu_name")
    return GpuAsk(count=max(0, min(MAX_GPUS, _int(resources.get("gpus")) or 0)),
                  memory_bytes=_int(resources.get("gpu_memory_bytes")) or None,
                  name=name[:MAX_GPU_NAME] if isinstance(name, str) and name else None)


def requirements_ask(req: Mapping[str, Any]) -> GpuAsk:
    """The GPU ask of reservation requirements (``any``: gpus, gpu_memory_bytes,
    gpu_name) or of a job's ``requirements`` (gpu_name only: the count is a resource)."""
    name = req.get("gpu_name")
    return GpuAsk(count=max(0, min(MAX_GPUS, _int(req.get("gpus")) or 0)),
                  memory_bytes=_int(req.get("gpu_memory_bytes")) or None,
                  name=name[:MAX_GPU_NAME] if isinstance(name, str) and name else None)


def caps_gpus(caps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The GPU objects of a worker's caps (schema-checked when they arrived), at most
    MAX_GPUS; anything malformed is left out."""
    gpus = caps.get("gpus") if isinstance(caps, Mapping) else None
    if not isinstance(gpus, list):
        return []
    return [g for g in gpus[:MAX_GPUS] if isinstance(g, dict)
            and isinstance(g.get("index"), int) and not isinstance(g.get("index"), bool)]


def gpu_matches(gpu: Mapping[str, Any], ask: GpuAsk) -> bool:
    """Whether one GPU meets the ask's memory minimum and name substring. A GPU that
    does not say its memory (or name) does not meet an ask for it."""
    if ask.memory_bytes:
        memory = _int(gpu.get("memory_bytes"))
        if memory is None or memory < ask.memory_bytes:
            return False
    if ask.name:
        name = gpu.get("name")
        if not isinstance(name, str) or ask.name.casefold() not in name.casefold():
            return False
    return True


def matching_gpus(caps: Mapping[str, Any], ask: GpuAsk) -> list[dict[str, Any]]:
    """The worker's GPUs that meet the ask (whatever its count)."""
    return [g for g in caps_gpus(caps) if gpu_matches(g, ask)]


def gpu_mismatch(caps: Mapping[str, Any], ask: GpuAsk) -> str | None:
    """Why a worker with these caps could never meet the ask, or None. An ask with a
    name or memory but no count wants at least one such GPU."""
    if not ask.count and not ask.filtered:
        return None
    wanted = max(1, ask.count)
    have = len(matching_gpus(caps, ask))
    if have >= wanted:
        return None
    if not caps_gpus(caps):
        return f"it has no GPUs, {ask.describe()} wanted"
    return f"it has {have} matching GPU(s), {ask.describe()} wanted"


def free_gpus(caps: Mapping[str, Any], ask: GpuAsk, held: int) -> int:
    """Matching GPUs not held by live attempts. The coordinator does not know which
    devices the held ones are, so it assumes the worst: every held GPU is a matching one
    (exact on a worker whose GPUs are all alike, the common case)."""
    return max(0, len(matching_gpus(caps, ask)) - max(0, held))
