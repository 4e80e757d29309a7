"""Executors: where commands actually run. One interface (``base.Executor``), one module
per driver: ``process`` (child process groups) and ``docker`` (containers).

``make_executor`` imports the docker driver (and so the docker SDK) only when asked
for, so a process-only worker stays small.
"""

from __future__ import annotations

from pathlib import Path

from broker.config import WorkerConfig
from worker.executors.base import Executor, ExecutorError

EXECUTORS = ("process", "docker")


def make_executor(name: str, config: WorkerConfig, state_dir: Path, wid: str) -> Executor:
    """The executor called ``name`` for worker ``wid``."""
    if name == "process":
        from worker.executors.process import ProcessExecutor

        return ProcessExecutor(state_dir)
    if name == "docker":
        from worker.executors.docker import DockerExecutor

        return DockerExecutor(config, worker_id=wid)
    raise ExecutorError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
