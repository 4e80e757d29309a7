"""The driver registry: every executor is found by name, imported only when asked for,
and built and described the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from broker.config import WorkerConfig
from worker.executors import (
    DRIVERS,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    driver_names,
    fingerprint,
    make_executor,
)
from worker.executors.process import ProcessExecutor


class FakeExecutor(ProcessExecutor):
    """A driver of its own name, registered by the tests below."""

    name: ClassVar[str] = "fake"
    built: ClassVar[list[ExecutorContext]] = []

    @classmethod
    def create(cls, context: ExecutorContext) -> FakeExecutor:
        cls.built.append(context)
        return cls(context.state_dir, config=context.config)

    @classmethod
    def fingerprint(cls, config: WorkerConfig) -> ExecutorCapabilities:  # noqa: ARG003
        return ExecutorCapabilities(name=cls.name, isolation="none", security_boundary=False)


NOT_A_DRIVER = object()


def test_the_built_in_drivers() -> None:
    assert driver_names() == ["process", "docker"]
    assert fingerprint("process", WorkerConfig()).security_boundary is False
    assert fingerprint("docker", WorkerConfig()).security_boundary is True


def test_unknown_names_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = ExecutorContext(WorkerConfig(), tmp_path, "w1")
    with pytest.raises(ExecutorError, match="unknown executor 'nope'; choose one of process"):
        make_executor("nope", context)
    with pytest.raises(ExecutorError, match="unknown executor"):
        fingerprint("nope", WorkerConfig())
    monkeypatch.setitem(DRIVERS, "odd", f"{__name__}:NOT_A_DRIVER")
    with pytest.raises(ExecutorError, match="not an Executor"):
        make_executor("odd", context)


def test_a_registered_driver_is_built_like_the_others(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DRIVERS, "fake", f"{__name__}:FakeExecutor")
    context = ExecutorContext(WorkerConfig(slots=3), tmp_path, "w1", kill_grace_s=2.0)
    ex = make_executor("fake", context)
    assert isinstance(ex, FakeExecutor)
    assert FakeExecutor.built[-1] == context
    assert ex.config.slots == 3
    assert ex.capabilities().name == "fake"
    assert fingerprint("fake", WorkerConfig()).name == "fake"


def test_a_process_only_worker_does_not_load_the_docker_driver() -> None:
    code = ("import sys, pathlib; import worker.main; from broker.config import WorkerConfig; "
            "from worker.executors import ExecutorContext, make_executor; "
            "make_executor('process', ExecutorContext(WorkerConfig(), pathlib.Path('.'), 'w')); "
            "sys.exit(sorted(m for m in sys.modules if m == 'docker' or "
            "m.startswith(('docker.', 'worker.executors.docker.driver'))) or 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
