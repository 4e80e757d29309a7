"""Jobs that run registered applications (docs/jobs.md, "Applications as jobs").

Real coordinator (jobs scheduler), real in-process workers, the Python client and the
CLI: a binaries app (a shell script as this worker's platform's binary) runs with its
arguments; an app with no binary for the worker's platform is never assigned and ``why``
says so; a command app; refusals at submit (unknown, someone else's private app, an image
archive without a command, command and app together); an image app goes to the docker
executor; an image archive app (a ``docker save`` tar) is loaded by the worker once and
its jobs run in that image, and a corrupt archive ends the attempt input_failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.transfer import file_sha256
from client.api import Grid
from client.console import Console
from client.errors import InvalidRequest
from client.jobs_cli import _app
from client.reservation import Refused
from client.shell import run_line
from client.shell_commands import Shell
from client.workflow import WorkflowError, load
from client.workflow_cli import cmd_workflow_run
from coordinator.store.apps import normalize_platform
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from tests.fixtures.transfer import make_file
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import agent

ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)
SCRIPT = '#!/bin/sh\necho "$# args:"; for a in "$@"; do echo "[$a]"; done\n'


def client_of(grid: GridHarness, name: str = "alice") -> Grid:
    client = grid.client(name, "client")
    client.jobs.poll_s = 0.5
    return client


def platform_of(grid: GridHarness, name: str) -> str:
    record = grid.store.get_worker(name)
    assert record is not None
    host = record.caps["host"]
    return normalize_platform(f"{host['os']}/{host['arch']}")


def other_platform(mine: str) -> str:
    return "linux/riscv64" if mine != "linux/riscv64" else "linux/s390x"


@ONE_BROKER
def test_a_binaries_app_runs_its_platforms_binary_with_the_arguments(
        grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1")
    alice = client_of(grid)
    mine = platform_of(grid, "w1")
    prog = tmp_path / "prog.sh"
    prog.write_text(SCRIPT)
    bogus = make_file(tmp_path / "bogus", 3000, seed=7)  # not runnable here
    alice.apps.add("prog", binaries={mine: prog, other_platform(mine): bogus})
    alice.apps.add("prog", binaries={mine: bogus})  # version 2: the job pins version 1
    fut = alice.submit(app="prog", app_version="1", args=["a b", "$HOME", "c'd"], wall=60)
    result = fut.result(timeout=60)
    assert result.ok, result.stderr
    assert result.stdout == b"3 args:\n[a b]\n[$HOME]\n[c'd]\n"
    spec = alice.jobs.show(fut.job).job["spec"]
    assert (spec["app"]["version"], spec["app"]["owner"]) == ("1", "alice")
    assert spec["command"].startswith("./.xcloud-app/prog ")
    # The job keeps both binaries from garbage collection while it exists.
    refs = grid.store.data_refs(file_sha256(prog))
    assert ("job", fut.job, "alice") in refs
    assert ("job", fut.job, "alice") in grid.store.data_refs(file_sha256(bogus))
    # Latest when no version is given (version 2's binary is the bogus file: it fails).
    latest = alice.submit(app="prog", wall=60)
    assert alice.jobs.show(latest.job).job["spec"]["app"]["version"] == "2"
    assert not latest.result(timeout=60).ok


@ONE_BROKER
def test_an_app_without_a_binary_for_the_platform_is_never_assigned(
        grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=3600)
    agent(grid, "w1")
    alice = client_of(grid)
    mine = platform_of(grid, "w1")
    foreign = other_platform(mine)
    alice.apps.add("armonly", binaries={foreign: make_file(tmp_path / "x", 100, seed=8)})
    stuck = alice.submit(app="armonly", args=["x"])
    assert alice.jobs.last_warnings == [{
        "job": stuck.job, "message": f"matches no known worker: no worker can run app "
        f"armonly 1: it has binaries for {foreign} only"}]
    # A runnable job submitted after it runs: the scheduler passed it over.
    assert alice.submit("echo ok").result(timeout=60).ok
    shown = alice.jobs.show(stuck.job)
    assert (shown.job["state"], shown.attempts) == ("queued", [])
    why = alice.jobs.why(stuck.job)
    (row,) = [r for r in why["requirements"] if r["name"] == "app"]
    assert (row["wanted"], row["match"], row["reject"]) == ("armonly 1", 0, 1)
    assert f"has no binary for {mine} (it has {foreign})" in row["example"]
    assert why["verdict"] == (f"no online worker can run app armonly 1: it has binaries "
                              f"for {foreign} only")


@ONE_BROKER
def test_a_command_app_and_the_cli(grid: GridHarness, tmp_path: Path) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1")
    alice = client_of(grid)
    alice.apps.add("greet", command="printf '%s|' hello")
    result = alice.submit(app="greet", args=["wor ld", "*"]).result(timeout=60)
    assert result.ok, result.stderr
    assert result.stdout == b"hello|wor ld|*|"
    # The CLI: --app NAME[@VERSION] then the arguments (with or without --).
    env = grid.subprocess_env(
        XCLOUD_HOME=str(tmp_path / "home"), XCLOUD_BUS_PRINCIPAL="alice",
        XCLOUD_BUS_TOKEN=grid.token("alice", "client"), XCLOUD_BUS_URL=grid.url,
        XCLOUD_BUS_ROOT=grid.root)
    sub = subprocess.run([sys.executable, "-m", "client.cli", "submit", "--app", "greet@1",
                          "--wait", "--", "x y"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip()
    assert alice.jobs.show(jid).job["spec"]["args"] == ["x y"]
    assert alice.jobs.result(jid).stdout == b"hello|x y|"
    # The shell's submit: --app, then the arguments after --.
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(alice, Console(out, err, False))
    assert run_line(shell, "submit --app greet@1 -- 'a b' c")
    assert run_line(shell, f"wait {shell.job_ids[-1]}"), err.getvalue()
    assert alice.jobs.result(shell.job_ids[-1]).stdout == b"hello|a b|c|"
    # A workflow node: app = "NAME", args = [...].
    flow = tmp_path / "flow.toml"
    flow.write_text('[jobs.hi]\napp = "greet"\napp_version = "1"\nargs = ["wf"]\n')
    assert cmd_workflow_run(argparse.Namespace(file=str(flow), json=False, wait=True,
                                               check=False), grid.config_for("alice")) == 0
    (ran,) = [j for j in alice.jobs.ls() if j["name"] == "hi"]
    assert alice.jobs.result(ran["id"]).stdout == b"hello|wf|"
    flow.write_text('[jobs.hi]\napp = "greet"\ncommand = "true"\n')
    with pytest.raises(WorkflowError, match="a command or an app, not both"):
        load(flow)


def test_cli_app_argument_parsing() -> None:
    assert _app("sim", ["--", "a"]) == {"app": "sim", "app_version": None,
                                        "app_owner": None, "args": ["a"]}
    assert _app("bob/sim@1.2", ["a", "--x"]) == {"app": "sim", "app_version": "1.2",
                                                  "app_owner": "bob", "args": ["a", "--x"]}
    for bad in ("sim@", "bob/", "@1"):
        with pytest.raises(InvalidRequest):
            _app(bad, [])


@ONE_BROKER
def test_refused_at_submit(grid: GridHarness, tmp_path: Path) -> None:
    grid.add_principals(("alice", "client"), ("bob", "client"))
    start_jobs_coordinator(grid)
    alice, bob = client_of(grid, "alice"), client_of(grid, "bob")
    alice.apps.add("secret", command="true")
    alice.apps.add("team", command="true", share=["bob"])
    alice.apps.add("tool", image_archive=make_file(tmp_path / "t.tar", 500, seed=9))
    cases: list[tuple[Grid, dict[str, Any], str, str]] = [
        (bob, {"app": {"name": "nothing"}}, "not_found", "job 0: you have no app nothing"),
        (bob, {"app": {"name": "secret", "owner": "alice"}}, "not_found",
         "job 0: alice has no app secret shared with bob"),
        (alice, {"app": {"name": "secret", "version": "7"}}, "not_found",
         "job 0: you have no app secret version 7"),
        (alice, {"app": {"name": "tool"}}, "invalid",
         "job 0: tool runs in the image of its archive: give the command to run in it"),
        (alice, {"app": {"name": "tool"}, "args": ["true"],
                 "requirements": {"executor": "process"}}, "invalid",
         "job 0: tool runs in the image of its archive: give no other executor or image"),
        (alice, {"app": {"name": "secret"}, "command": "true"}, "invalid",
         "job 0: give a command or an app, not both"),
        (alice, {"command": "true", "args": ["x"]}, "invalid", "args go with an app"),
    ]
    for who, spec, code, text in cases:
        with pytest.raises(Refused) as info:
            who.jobs.submit_specs([spec])
        assert info.value.code == code, (spec, info.value)
        assert text in str(info.value), (spec, info.value)
    with pytest.raises(InvalidRequest):
        alice.jobs.spec("true", app="secret")
    # Shared with bob: his job is accepted and pinned to alice's app.
    fut = bob.submit(app="team", app_owner="alice")
    assert bob.jobs.show(fut.job).job["spec"]["app"]["owner"] == "alice"
    assert alice.jobs.ls() == []


@pytest.mark.parametrize("executor_kind", ["docker"], indirect=True)
@ONE_BROKER
def test_an_image_app_runs_with_the_docker_executor(grid: GridHarness,
                                                   executor_kind: str) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "d1", executor=executor_kind)
    alice = client_of(grid)
    alice.apps.add("bb", image=BUSYBOX_IMAGE)
    fut = alice.submit(app="bb", args=["sh", "-c", "echo in; test -f /.dockerenv && echo d"])
    result = fut.result(timeout=90)
    assert result.ok, result.stderr
    assert result.stdout == b"in\nd\n"
    spec = alice.jobs.show(fut.job).job["spec"]
    assert spec["requirements"] == {"executor": "docker", "image": BUSYBOX_IMAGE}


def test_place_marks_only_flagged_inputs_executable(tmp_path: Path) -> None:
    from worker.job_files import place

    source = tmp_path / "src"
    source.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    plain = place(source, work, "data.sh")
    binary = place(source, work, ".xcloud-app/prog", executable=True)
    assert not os.stat(plain).st_mode & stat.S_IXUSR
    assert os.stat(binary).st_mode & 0o777 == 0o755


# -- image_archive apps (worker/image_archives.py) -------------------------------------


@pytest.fixture
def archived_images(docker_engine: Any) -> Iterator[list[str]]:
    """Image ids a test made or had loaded: removed after the grid (and its containers)
    is gone (list this fixture before ``grid``)."""
    made: list[str] = []
    yield made
    import docker.errors

    for image_id in made:
        with contextlib.suppress(docker.errors.NotFound):
            docker_engine.images.remove(image_id, force=True)


def saved_image(engine: Any, path: Path, marker: bytes, made: list[str]) -> str:
    """A tiny image (busybox plus /marker) saved with ``docker save`` to ``path``, then
    removed from the engine, so that only loading the archive brings it back; its id."""
    container = engine.containers.create(BUSYBOX_IMAGE, command=["true"])
    try:
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            info = tarfile.TarInfo("marker")
            info.size, info.mode = len(marker), 0o644
            archive.addfile(info, io.BytesIO(marker))
        container.put_archive("/", tar.getvalue())
        image = container.commit(repository="xcloud-test-archive",
                                 tag=uuid.uuid4().hex[:12])
    finally:
        container.remove(force=True)
    made.append(str(image.id))
    with path.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)
    engine.images.remove(image.id, force=True)
    return str(image.id)


@pytest.mark.parametrize("executor_kind", ["docker"], indirect=True)
@ONE_BROKER
def test_an_image_archive_app_is_loaded_once_and_runs_in_its_image(
        archived_images: list[str], grid: GridHarness, executor_kind: str,
        docker_engine: Any, tmp_path: Path) -> None:
    import docker.errors

    start_jobs_coordinator(grid)
    worker = agent(grid, "d1", executor=executor_kind)
    alice = client_of(grid)
    marker = f"from the archive {uuid.uuid4().hex}\n".encode()
    tar = tmp_path / "tool.tar"
    image_id = saved_image(docker_engine, tar, marker, archived_images)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(image_id)  # the worker must load the archive
    alice.apps.add("tool", image_archive=tar)
    fut = alice.submit(app="tool", args=["cat", "/marker"], wall=120)
    result = fut.result(timeout=120)
    assert result.ok, result.stderr
    assert result.stdout == marker
    spec = alice.jobs.show(fut.job).job["spec"]
    sha = file_sha256(tar)
    assert (spec["app"]["sha256"], spec["app"]["size"]) == (sha, tar.stat().st_size)
    assert spec["requirements"] == {"executor": "docker"}
    assert ("job", fut.job, "alice") in grid.store.data_refs(sha)  # kept while it exists
    assert worker.agent is not None
    assert worker.agent.jobs is not None
    archives = worker.agent.jobs.archives
    assert archives.loads == 1
    assert docker_engine.images.get(image_id).id == image_id  # loaded: the same image
    # A second job of the app runs in the image loaded before: no second load.
    again = alice.submit(app="tool", args=["sh", "-c", "cat /marker; echo again"], wall=120)
    second = again.result(timeout=120)
    assert second.ok, second.stderr
    assert second.stdout == marker + b"again\n"
    assert archives.loads == 1
    # The engine lost the image: the next job loads the archive again. (The worker closes
    # a job's session once its report is on its way: the second job's container may be
    # going still, and an image a container uses cannot be removed.)
    # (ignore_removed: one removed between the SDK's listing and its inspect of each
    # raised NotFound: a flake in CI)
    wait_for(lambda: not docker_engine.containers.list(
                 all=True, filters={"ancestor": image_id}, ignore_removed=True),
             timeout=30, message="the second job's container removed")
    docker_engine.images.remove(image_id, force=True)
    third = alice.submit(app="tool", args=["cat", "/marker"], wall=120).result(timeout=120)
    assert third.ok, third.stderr
    assert third.stdout == marker
    assert archives.loads == 2
    # A file that is not a docker save archive: input_failed with the engine's reason.
    alice.apps.add("broken", image_archive=make_file(tmp_path / "junk.tar", 4000, seed=3))
    bad = alice.submit(app="broken", args=["true"], system_retries=0, wall=120)
    assert not bad.result(timeout=120).ok
    (attempt,) = alice.jobs.show(bad.job).attempts
    assert attempt["kind"] == "input_failed"
    assert "is not a docker save archive docker can load" in attempt["error"], attempt
    assert "invalid tar header" in attempt["error"], attempt
    assert archives.loads == 2


class _Gate:
    """A stand-in engine whose loads wait for ``go`` (so a second caller arrives while
    the first load is under way) and whose images can be forgotten."""

    def __init__(self) -> None:
        self.images = self
        self.entered = threading.Event()
        self.go = threading.Event()
        self.loaded: list[bytes] = []
        self.held: set[str] = set()

    def load(self, stream: Any) -> list[Any]:
        data = stream.read()
        self.loaded.append(data)
        self.entered.set()
        assert self.go.wait(30)
        image_id = f"sha256:{len(self.loaded):064x}"
        self.held.add(image_id)
        return [argparse.Namespace(id=image_id)]

    def get(self, image_id: str) -> Any:
        import docker.errors

        if image_id not in self.held:
            raise docker.errors.ImageNotFound(image_id)
        return argparse.Namespace(id=image_id)


def test_image_archives_load_each_archive_once(tmp_path: Path) -> None:
    from worker.image_archives import ImageArchives
    from worker.input_cache import InputCache

    source = make_file(tmp_path / "a.tar", 5000, seed=4)
    sha = file_sha256(source)
    fetched: list[str] = []

    def fetch(wanted: str, dest: Path) -> None:
        fetched.append(wanted)
        dest.write_bytes(source.read_bytes())

    cache = InputCache(tmp_path / "cache", 1 << 20, fetch)
    engine = _Gate()
    archives = ImageArchives(tmp_path / "state", cache, client=lambda: engine)
    got: list[str] = []
    first = threading.Thread(target=lambda: got.append(archives.image(sha)))
    first.start()
    assert engine.entered.wait(30)
    second = threading.Thread(target=lambda: got.append(archives.image(sha)))
    second.start()
    wait_for(lambda: archives.waited, 30, message="the second caller never waited")
    engine.go.set()
    first.join(30)
    second.join(30)
    assert got == ["sha256:" + f"{1:064x}"] * 2
    assert (archives.loads, len(engine.loaded), fetched) == (1, 1, [sha])
    assert engine.loaded[0] == source.read_bytes()
    # A restarted worker knows the image; once the engine lost it, it loads again.
    again = ImageArchives(tmp_path / "state", cache, client=lambda: engine)
    assert (again.image(sha), again.loads) == (got[0], 0)
    engine.held.clear()
    assert (again.image(sha), again.loads) == (f"sha256:{2:064x}", 1)
