"""Stopping `xcloud up` removes everything its workers made for reservations (issue 8
item 15): Ctrl-C while a client holds a worker leaves no container, no session dir, no
command running. Each test runs a grid of its own (`xcloud up`, tests/fixtures/e2e.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from broker.config import Config, WorkerConfig
from client.api import Grid
from coordinator.local_grid import LocalGrid, WorkerProcess
from tests.executors.harness import marked_processes
from tests.fixtures.backends import EXECUTOR_KINDS
from tests.fixtures.e2e import E2EGrid
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from worker.executors.base import SessionSpec
from worker.executors.docker.container import LABEL_STATE_DIR, Containers

if TYPE_CHECKING:
    import docker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(params=EXECUTOR_KINDS)
def one_worker_grid(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[E2EGrid]:
    """`xcloud up` with one worker of the parametrized executor."""
    engine = None
    if request.param == "docker":
        request.getfixturevalue("docker_image")(BUSYBOX_IMAGE)
        engine = request.getfixturevalue("docker_engine")
    grid = E2EGrid(tmp_path / "home", workers=1, executor=request.param, engine=engine)
    grid.start()
    try:
        yield grid
    finally:
        grid.stop()


def test_ctrl_c_on_xcloud_up_leaves_nothing_of_a_held_reservation(
        one_worker_grid: E2EGrid) -> None:
    grid = one_worker_grid
    principal, token = grid.add_principal("holder")
    client = Grid.connect(grid.config(principal, token))
    try:
        worker = client.reserve()
        worker.start("sleep 600")
        worker.run("echo kept > file")
        (wid,) = grid.worker_ids()
        made = grid.sessions(wid)
        assert made, "the reservation made no session"
        if grid.docker:
            assert any(k.startswith("container ") for k in made), made
        assert marked_processes(grid.home) or grid.docker
        # Ctrl-C: the terminal signals `xcloud up` (its workers run in sessions of
        # their own) while the client still holds the worker.
        assert grid.proc is not None
        os.kill(grid.proc.pid, signal.SIGINT)
        assert grid.proc.wait(60) == 0, grid.log_text()
        assert grid.sessions() == {}, (grid.sessions(), grid.worker_log(wid))
        wait_for(lambda: not marked_processes(grid.home), message="a command survived")
    finally:
        with contextlib.suppress(Exception):
            client.close()


def test_the_sweep_removes_what_a_killed_docker_worker_left(
        tmp_path: Path, docker_engine: docker.DockerClient) -> None:
    # A worker killed with -9 cannot remove its containers; `xcloud up` sweeps them by
    # the state-dir label of its workers, and only theirs.
    mine, other = tmp_path / "workers" / "w1", tmp_path / "elsewhere" / "w1"
    names = []
    for state_dir in (mine, other):
        containers = Containers(WorkerConfig(docker_image=BUSYBOX_IMAGE), "w1",
                                docker_engine, state_dir)
        name = f"s-{uuid.uuid4().hex[:8]}"
        work = state_dir / "sessions" / name / "work"
        params = containers.params(SessionSpec(name, work, "alice"))
        containers.prepare_workdir(work, params.user)
        containers.create(name, str(work), params)
        names.append(name)
    try:
        grid = LocalGrid(Config(home=tmp_path / "home"), 0, "docker")
        grid.workers.append(WorkerProcess("w1", mine, tmp_path / "w1.log"))
        removed = grid.sweep_containers()
        assert len(removed) == 1
        assert names[0] in removed[0]
        left = docker_engine.api.containers(
            all=True, filters={"label": [f"{LABEL_STATE_DIR}={other.resolve()}"]})
        assert len(left) == 1  # another grid's worker of the same id is not touched
    finally:
        for state_dir in (mine, other):
            for found in docker_engine.api.containers(
                    all=True, filters={"label": [f"{LABEL_STATE_DIR}={state_dir.resolve()}"]}):
                docker_engine.api.remove_container(found["Id"], force=True)
