"""Executors: where commands actually run. One interface (``base.Executor``), one module
(or package) per driver: ``process`` (child process groups) and ``docker`` (containers),
found by name in ``registry`` and imported only when asked for, so a process-only
worker stays small.
"""

from __future__ import annotations

from worker.executors.base import (
    DriverState,
    EngineInfo,
    Executor,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    ExitResult,
)
from worker.executors.registry import DRIVERS, driver_names, fingerprint, make_executor

__all__ = [
    "DRIVERS",
    "DriverState",
    "EngineInfo",
    "Executor",
    "ExecutorCapabilities",
    "ExecutorContext",
    "ExecutorError",
    "ExitResult",
    "driver_names",
    "fingerprint",
    "make_executor",
]
