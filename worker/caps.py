"""The capability document a worker publishes (retained) on ``{root}/worker/{wid}/caps``.

Like XtremWeb-HEP's worker configuration: what the machine is (host, CPU, memory,
disk, Docker) and what its owner offers (slots, tags, shared apps/packages/data,
executors), so the coordinator can match jobs and clients can choose a worker. The
executors part is built from the drivers' ``ExecutorCapabilities`` (their fingerprints).
"""

from __future__ import annotations

import logging
import platform
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from broker.config import WorkerConfig
from schemas.messages import WorkerCaps
from worker.executors.base import ExecutorCapabilities
from worker.executors.docker.fingerprint import probe_docker
from worker.gpus import detect_gpus

log = logging.getLogger(__name__)

JOB_QUEUE_MAX = 64  # worker.caps job_queue's bound

MAX_NAME = 128


def _os_release() -> str:
    """PRETTY_NAME from /etc/os-release (the distribution), else the kernel release."""
    for candidate in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(candidate, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    key, _, value = line.strip().partition("=")
                    if key == "PRETTY_NAME" and value:
                        return value.strip().strip('"').strip("'")
        except OSError:
            continue
    return platform.release()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_freq_mhz() -> float | None:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        return None
    if freq is None:
        return None
    mhz = float(freq.max or freq.current or 0.0)
    return round(mhz, 1) if mhz > 0 else None


def existing_dir(path: Path | str) -> Path:
    """``path`` or its nearest existing ancestor (disk usage needs a real path)."""
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def host_info() -> dict[str, str]:
    return {
        "hostname": socket.gethostname(),
        "os": platform.system().lower(),
        "os_release": _os_release(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }


def cpu_info() -> dict[str, Any]:
    try:
        physical = psutil.cpu_count(logical=False)
    except (OSError, NotImplementedError):
        physical = None
    return {
        "count": psutil.cpu_count(logical=True) or 1,
        "physical": physical,
        "model": _cpu_model(),
        "freq_mhz": _cpu_freq_mhz(),
    }


def engine_document(executors: Sequence[ExecutorCapabilities]) -> dict[str, Any]:
    """worker.caps' ``docker`` object: the engine an executor's fingerprint saw, else a
    probe of its own (the machine's engine is advertised whatever the executors)."""
    for caps in executors:
        if caps.engine is not None:
            return caps.engine.to_wire()
    return probe_docker()


def collect_caps(
    wid: str,
    cfg: WorkerConfig,
    state_dir: Path | str,
    executors: Sequence[ExecutorCapabilities],
    agent_version: str,
    *,
    docker: dict[str, Any] | None = None,
) -> WorkerCaps:
    """Measure this machine and combine it with the owner's configuration and what the
    executors offer (``executors``: their fingerprints, in the worker's order).

    ``docker`` overrides the engine document (tests; or a caller that already probed).
    """
    host = host_info()
    disk_total = disk_free = None
    try:
        usage = psutil.disk_usage(str(existing_dir(state_dir)))
        disk_total, disk_free = int(usage.total), int(usage.free)
    except OSError as err:
        log.warning("cannot measure the disk holding %s: %s", state_dir, err)
    return WorkerCaps(
        wid=wid,
        name=(cfg.name or host["hostname"])[:MAX_NAME],
        description=cfg.description or None,
        tags=[t for t in (tag.strip() for tag in cfg.tags) if t],
        slots=cfg.slots,
        executors=[caps.name for caps in executors],
        host=host,
        cpu=cpu_info(),
        memory_bytes=int(psutil.virtual_memory().total),
        disk_total_bytes=disk_total,
        disk_free_bytes=disk_free,
        docker=docker if docker is not None else engine_document(executors),
        shared={
            "apps": list(cfg.shared_apps),
            "packages": list(cfg.shared_packages),
            "data": list(cfg.shared_data),
        },
        heartbeat_s=cfg.heartbeat_s,
        agent_version=agent_version[:64],
        gpus=[gpu.to_wire() for gpu in detect_gpus()] or None,
        job_queue=min(max(0, int(cfg.job_queue)), JOB_QUEUE_MAX),
    )
