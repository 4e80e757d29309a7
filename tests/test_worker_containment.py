"""Nothing outlives its reservation, or its worker (issue 8 item 12), on a real grid (on
each broker kind) with `xcloud worker` processes that a test kills with SIGKILL:

- process executor: the worker's background commands, whatever they did to hide (their
  own session, scrubbed markers), die with the worker, before it is even restarted (the
  reaper; worker/executors/containment.py);
- docker executor: the session's container outlives the killed worker (the engine runs
  it), and goes at the latest when the worker restarts: the restarted worker recovers
  the session and the coordinator closes it, its reservation having ended.

The executor-level tests of each containment mode are in tests/test_process_executor.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from worker.executors.docker.container import LABEL_STATE_DIR

if TYPE_CHECKING:
    import docker

pytestmark = [pytest.mark.integration]

#: The coordinator's default liveness deadline (heartbeat 5 s x factor 2).
HEARTBEAT_DEADLINE_S = 10.0
#: Three background commands, each hidden a little more; prints their pids.
HIDDEN = ("sleep 600 >/dev/null 2>&1 & a=$!; setsid sleep 601 >/dev/null 2>&1 & b=$!; "
          "env -u XCLOUD_RESERVATION -u XCLOUD_EXEC_ID -u XCLOUD_WORKDIR "
          "setsid nohup sleep 602 >/dev/null 2>&1 & c=$!; echo $a $b $c")


class CliWorker:
    """`xcloud worker` as a process of its own, killed and restarted by the test."""

    def __init__(self, grid: GridHarness, wid: str, executor: str) -> None:
        self.grid = grid
        self.wid = wid
        self.state_dir = grid.tmp_path / "workers" / wid
        self.log_path = grid.tmp_path / f"worker-{wid}.log"
        self.env = grid.subprocess_env(
            XCLOUD_HOME=str(grid.tmp_path / f"home-{wid}"), XCLOUD_BUS_PRINCIPAL=wid,
            XCLOUD_BUS_TOKEN=grid.token(wid, "worker"), XCLOUD_WORKER_EXECUTOR=executor,
            XCLOUD_WORKER_DOCKER_IMAGE=BUSYBOX_IMAGE)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "worker", "--broker", self.grid.url,
                 "--root", self.grid.root, "--state-dir", str(self.state_dir),
                 "--heartbeat", "0.2"],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.grid.wait_worker(self.wid, "online", timeout=20)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""


@pytest.fixture
def cli_workers() -> Iterator[list[CliWorker]]:
    made: list[CliWorker] = []
    yield made
    for worker in made:
        worker.stop()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_background_commands_die_with_a_killed_process_worker(
        grid: GridHarness, cli_workers: list[CliWorker]) -> None:
    grid.start_coordinator()
    worker = CliWorker(grid, "wp", "process")
    cli_workers.append(worker)
    worker.start()
    client = grid.client("alice", "client")
    held = client.reserve("wp")
    result = held.run(HIDDEN)
    pids = [int(p) for p in result.stdout.split()]
    try:
        assert len(pids) == 3
        assert not any(_gone(p) for p in pids)
        worker.kill()
        # Not restarted: the reaper saw the worker go and killed them all.
        wait_for(lambda: all(_gone(p) for p in pids), timeout=HEARTBEAT_DEADLINE_S,
                 message=f"a command outlived its worker\n{worker.log()}")
        grid.wait_worker("wp", "lost")
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def _containers(engine: docker.DockerClient, state_dir: Path) -> list[str]:
    found = engine.api.containers(
        all=True, filters={"label": [f"{LABEL_STATE_DIR}={state_dir.resolve()}"]})
    return [str(c["Id"]) for c in found]


@pytest.mark.docker
def test_a_killed_docker_workers_container_goes_when_it_restarts(
        grid: GridHarness, cli_workers: list[CliWorker],
        docker_engine: docker.DockerClient, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("docker_image")(BUSYBOX_IMAGE)
    grid.start_coordinator()
    worker = CliWorker(grid, "wd", "docker")
    cli_workers.append(worker)
    worker.start()
    client = grid.client("alice", "client")
    held = client.reserve("wd")
    held.start("sleep 600")
    try:
        (container,) = _containers(docker_engine, worker.state_dir)
        worker.kill()
        grid.wait_worker("wd", "lost")
        wait_for(lambda: held.ended, message="the holder was not told")
        # The engine keeps the container while nobody runs the worker...
        assert _containers(docker_engine, worker.state_dir) == [container]
        # ... and it goes when the worker comes back: the session is recovered, and
        # closed, as its reservation ended.
        worker.start()
        wait_for(lambda: not _containers(docker_engine, worker.state_dir), timeout=20,
                 message=f"the container outlived its reservation\n{worker.log()}")
        wait_for(lambda: not list((worker.state_dir / "sessions").glob("*")),
                 message="the session dir outlived its reservation")
    finally:
        for cid in _containers(docker_engine, worker.state_dir):
            docker_engine.api.remove_container(cid, force=True)
