"""The docker driver (see driver.py): sessions are hardened containers, tasks are execs.

Its names are imported on first use (PEP 562): the worker's caps document needs only
the engine probe (``fingerprint``), so a worker that runs the process driver never
loads the rest; and nothing here imports the docker SDK, the driver does on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.executors.docker.container import (
        LABEL_EXECUTOR,
        LABEL_OWNER,
        LABEL_SESSION,
        LABEL_STATE_DIR,
        LABEL_WORKER,
        ContainerParams,
        Containers,
        remove_labelled,
    )
    from worker.executors.docker.driver import DockerExecutor
    from worker.executors.docker.fingerprint import (
        docker_capabilities,
        probe_docker,
        probe_engine,
    )
    from worker.executors.docker.state import SessionState, TaskState, container_of

_HOMES = {
    "LABEL_EXECUTOR": "container",
    "LABEL_OWNER": "container",
    "LABEL_SESSION": "container",
    "LABEL_STATE_DIR": "container",
    "LABEL_WORKER": "container",
    "ContainerParams": "container",
    "Containers": "container",
    "remove_labelled": "container",
    "DockerExecutor": "driver",
    "SessionState": "state",
    "TaskState": "state",
    "container_of": "state",
    "docker_capabilities": "fingerprint",
    "probe_docker": "fingerprint",
    "probe_engine": "fingerprint",
}

__all__ = [
    "LABEL_EXECUTOR",
    "LABEL_OWNER",
    "LABEL_SESSION",
    "LABEL_STATE_DIR",
    "LABEL_WORKER",
    "ContainerParams",
    "Containers",
    "DockerExecutor",
    "SessionState",
    "TaskState",
    "container_of",
    "docker_capabilities",
    "probe_docker",
    "probe_engine",
    "remove_labelled",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
