"""The driver catalog: every executor is found by name and built the same way.

Like Nomad's plugin catalog: a name maps to the driver's class, given as an import path
and imported only when that driver is asked for, so a process-only worker never loads
the docker driver's dependencies (the docker SDK is imported by the driver itself, on
first use). Every driver is built with ``Driver.create(ExecutorContext)`` and describes
itself with ``Driver.fingerprint(config)``; nothing here knows one driver from another.
A new driver (batch containers, say) is one line in ``DRIVERS``.
"""

from __future__ import annotations

import importlib

from broker.config import WorkerConfig
from worker.executors.base import (
    Executor,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    SessionHandle,
    WorkdirAccess,
)

#: name -> "module:Class" of the driver.
DRIVERS: dict[str, str] = {
    "process": "worker.executors.process:ProcessExecutor",
    "docker": "worker.executors.docker:DockerExecutor",
}


def driver_names() -> list[str]:
    return list(DRIVERS)


def driver_class(name: str) -> type[Executor]:
    """The class of driver ``name`` (its module imported now); ExecutorError if unknown."""
    target = DRIVERS.get(name)
    if target is None:
        raise ExecutorError(
            f"unknown executor {name!r}; choose one of {', '.join(DRIVERS)}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ExecutorError(f"executor {name!r} ({target}) is not an Executor")
    return cls


def make_executor(name: str, context: ExecutorContext) -> Executor:
    """The driver called ``name``, built for one worker."""
    return driver_class(name).create(context)


def fingerprint(name: str, config: WorkerConfig) -> ExecutorCapabilities:
    """What driver ``name`` offers on this machine (cheap; for the caps document)."""
    return driver_class(name).fingerprint(config)


def workdir_access(session: SessionHandle) -> WorkdirAccess:
    """How ``session``'s commands see its work dir, as the driver that wrote the handle
    says (the default ``WorkdirAccess()`` for a driver this worker does not know)."""
    try:
        cls = driver_class(session.executor)
    except ExecutorError:
        return WorkdirAccess()
    return cls.workdir_access(session)
