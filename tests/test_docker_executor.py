"""The docker executor against the real engine (worker/executors/docker/): what only this
driver does (hardening, containers, OOM reports, recreation, labels). What every driver
does is in tests/executors/.

Most tests share one busybox session container (fast); a few open their own. Hardening
is checked from inside the container, the way a hostile command would see it. Every
container carries the label ``xcloud.worker=<this module's worker id>``, and the module
fixture fails if one is left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from broker.config import WorkerConfig
from tests.executors.harness import run, start
from tests.fixtures.services import wait_for
from worker.executors.base import (
    ExecutorError,
    Limits,
    SessionHandle,
    SessionSpec,
)
from worker.executors.docker import (
    LABEL_SESSION,
    LABEL_WORKER,
    DockerExecutor,
    SessionState,
    container_of,
)

if TYPE_CHECKING:
    import docker

pytestmark = [pytest.mark.docker]

BUSYBOX = "xcloud-busybox:latest"
DEBIAN = "xcloud-base:bookworm"
MIB = 1024 * 1024
WORKER_ID = f"test-dx-{uuid.uuid4().hex[:8]}"


def containers(engine: docker.DockerClient, session_id: str | None = None) -> list[str]:
    labels = [f"{LABEL_WORKER}={WORKER_ID}"]
    if session_id:
        labels.append(f"{LABEL_SESSION}={session_id}")
    # ignore_removed: a container removed between the SDK's listing and its inspect of
    # each raises NotFound otherwise (callers poll while sessions close)
    listed = engine.containers.list(all=True, filters={"label": labels}, ignore_removed=True)
    return [c.id for c in listed if c.id is not None]  # the stubs allow an id-less model


@pytest.fixture(scope="module")
def executor(docker_engine: docker.DockerClient,
             docker_image: Callable[[str], str]) -> Iterator[DockerExecutor]:
    docker_image(BUSYBOX)
    ex = DockerExecutor(WorkerConfig(docker_image=BUSYBOX, docker_memory_bytes=64 * MIB),
                        worker_id=WORKER_ID)
    yield ex
    ex.close()
    leaked = containers(docker_engine)
    for cid in leaked:
        docker_engine.api.remove_container(cid, force=True)
    assert not leaked, f"containers left behind: {leaked}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def session(executor: DockerExecutor,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionHandle]:
    work = tmp_path_factory.mktemp("docker-session") / "work"
    work.mkdir()
    handle = executor.open_session(SessionSpec("sess-main", work, "alice"))
    yield handle
    executor.close_session(handle)


# ---------------------------------------------------------------------------- hardening


def test_hardening_seen_from_inside(executor: DockerExecutor, session: SessionHandle) -> None:
    cmd = (
        "echo net:$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); "
        "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
        "echo uid:$(id -u); "
        "if touch /hardening-probe 2>/dev/null; then echo root:writable; "
        "else echo root:refused; fi; "
        "touch /work/probe && echo work:writable; "
        "touch /tmp/probe && echo tmp:writable"
    )
    result, out = run(executor, session, cmd)
    assert result.exit_code == 0, out.text("stderr")
    lines = out.text().splitlines()
    assert "net:lo," in lines  # only the loopback interface
    assert "CapEff:\t0000000000000000" in lines
    assert "CapPrm:\t0000000000000000" in lines
    assert "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "Seccomp:\t2" in lines  # the engine's default seccomp profile (filter mode)
    assert "uid:1000" in lines
    assert "root:refused" in lines
    assert "work:writable" in lines
    assert "tmp:writable" in lines
    assert (Path(session.workdir) / "probe").exists()


@pytest.mark.usefixtures("executor")
def test_container_configuration(session: SessionHandle,
                                 docker_engine: docker.DockerClient) -> None:
    attrs = docker_engine.api.inspect_container(container_of(session))
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Privileged"] is False
    assert host["Memory"] == host["MemorySwap"] == 64 * MIB
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 256
    assert "/tmp" in host["Tmpfs"]
    assert attrs["Config"]["User"] == "1000:1000"
    assert attrs["Config"]["Labels"][LABEL_WORKER] == WORKER_ID
    assert attrs["Config"]["Labels"]["xcloud.owner"] == "alice"


def test_memory_hog_is_reported_oom_killed(executor: DockerExecutor,
                                           session: SessionHandle) -> None:
    # busybox tail keeps the last lines; /dev/zero has no newline, so it never stops
    # growing its buffer until the 64 MiB cgroup limit kills it.
    result, out = run(executor, session, "echo before; tail /dev/zero")
    assert result.oom_killed, (result, out.parts)
    assert result.signal == signal.SIGKILL
    assert result.exit_code is None
    # A command that survives losing a process to the OOM killer says so too.
    result, out = run(executor, session, "tail /dev/zero | cat; echo after")
    assert result.oom_killed, (result, out.parts)
    assert result.exit_code == 0, (result, out.parts)
    assert out.text() == "after\n"
    # The session container survived, and a plain SIGKILL is not an OOM.
    result, out = run(executor, session, "echo alive")
    assert result.exit_code == 0
    assert out.text() == "alive\n"
    result, _ = run(executor, session, "kill -9 $$")
    assert result.exit_code == 137
    assert not result.oom_killed


# ---------------------------------------------------------------------- signals and stop


def test_ctrl_c_stops_sleep(executor: DockerExecutor, session: SessionHandle) -> None:
    handle, out = start(executor, session, "echo started; sleep 30 | cat")
    wait_for(lambda: "started" in out.text(), timeout=10, message="command started")
    executor.signal(handle, signal.SIGINT)
    result = executor.wait(handle, timeout=5)
    assert result is not None, "INT did not stop sleep 30"
    assert result.signal == signal.SIGINT
    assert result.exit_code is None
    assert result.duration_s < 5
    # Nothing of it is left in the container.
    _, ps = run(executor, session, "ps | grep -c '[s]leep 30' || true")
    assert ps.text().strip() == "0"


# ------------------------------------------------------------------------------ sessions


def test_open_session_is_idempotent_and_close_removes_the_container(
        executor: DockerExecutor, workdir: Path, docker_engine: docker.DockerClient) -> None:
    spec = SessionSpec("sess-close", workdir, "bob", Limits(memory_bytes=32 * MIB, pids=64))
    first = executor.open_session(spec)
    again = executor.open_session(spec)
    assert container_of(first) == container_of(again)
    assert containers(docker_engine, "sess-close") == [container_of(first)]
    host = docker_engine.api.inspect_container(container_of(first))["HostConfig"]
    assert host["Memory"] == 32 * MIB
    assert host["PidsLimit"] == 64
    # The worker's settings are ceilings: asking for more gets the worker's limit.
    greedy = executor.open_session(SessionSpec(
        "sess-greedy", workdir.parent / "greedy", "bob",
        Limits(memory_bytes=2**40, cpus=64.0, pids=10**6)))
    try:
        host = docker_engine.api.inspect_container(container_of(greedy))["HostConfig"]
        assert host["Memory"] == 64 * MIB
        assert host["PidsLimit"] == 256
        assert host["NanoCpus"] == 1_000_000_000
    finally:
        executor.close_session(greedy)
    handle, out = start(executor, first, "echo up; sleep 30")
    wait_for(lambda: "up" in out.text(), timeout=10, message="command started")
    executor.close_session(first)
    assert containers(docker_engine, "sess-close") == []
    result = executor.wait(handle, timeout=10)
    assert result is not None
    assert result.signal == signal.SIGTERM  # TERM first
    assert workdir.is_dir()  # the work dir is the caller's to remove


def test_close_kills_what_ignores_term(docker_engine: docker.DockerClient,
                                       workdir: Path) -> None:
    quick = DockerExecutor(WorkerConfig(docker_image=BUSYBOX), worker_id=WORKER_ID,
                           kill_grace_s=0.3)
    session = quick.open_session(SessionSpec("sess-stubborn", workdir, "bob"))
    handle, out = start(quick, session, "trap '' TERM; echo up; sleep 30")
    wait_for(lambda: "up" in out.text(), timeout=10, message="command started")
    quick.close_session(session)
    result = quick.wait(handle, timeout=10)
    assert result is not None
    assert result.signal == signal.SIGKILL
    assert result.error == "session closed"
    assert containers(docker_engine, "sess-stubborn") == []
    quick.close()


def test_dead_container_is_recreated_on_next_start(
        executor: DockerExecutor, workdir: Path, docker_engine: docker.DockerClient) -> None:
    handle = executor.open_session(SessionSpec("sess-dead", workdir, "bob"))
    try:
        run(executor, handle, "mkdir -p keep && cd keep && echo kept > f")
        old = container_of(handle)
        docker_engine.api.kill(old)  # as if its PID 1 had died
        result, out = run(executor, handle, "pwd; cat f")
        assert result.exit_code == 0, out.text("stderr")
        assert out.text() == "/work/keep\nkept\n"  # the work dir (and cwd) survived
        assert container_of(handle) != old
        assert SessionState.of(handle).recreated == 1
        assert containers(docker_engine, "sess-dead") == [container_of(handle)]
    finally:
        executor.close_session(handle)


def test_cleanup_orphans_and_recover(executor: DockerExecutor, workdir: Path,
                                     docker_engine: docker.DockerClient) -> None:
    kept = executor.open_session(SessionSpec("sess-keep", workdir, "carol"))
    docker_engine.containers.run(
        BUSYBOX, ["sleep", "2147483647"], network_mode="none", detach=True,
        labels={LABEL_WORKER: WORKER_ID, LABEL_SESSION: "sess-stray"})
    other = docker_engine.containers.run(
        BUSYBOX, ["sleep", "2147483647"], network_mode="none", detach=True,
        labels={LABEL_WORKER: f"{WORKER_ID}-other", LABEL_SESSION: "sess-stray"})
    try:
        removed = executor.cleanup_orphans({"sess-keep", "sess-main"})
        assert removed == 1
        assert containers(docker_engine, "sess-stray") == []
        assert containers(docker_engine, "sess-keep") == [container_of(kept)]
        other.reload()  # another worker's container is none of our business
        # A restarted agent: a fresh executor finds the running session, not a gone one.
        fresh = DockerExecutor(executor.config, worker_id=WORKER_ID)
        # The running container is found by its labels, not by the id in the handle.
        stale = SessionState.of(kept)
        stale.container_id = ""
        found = SessionHandle("sess-keep", "docker", str(workdir), driver_state=stale.dump())
        stale.container_id = "0" * 64
        gone = SessionHandle("sess-gone", "docker", str(workdir), driver_state=stale.dump())
        alive = fresh.recover([found, gone])
        assert [h.session_id for h in alive] == ["sess-keep"]
        assert container_of(alive[0]) == container_of(kept)
        result, out = run(fresh, alive[0], "echo recovered")
        assert out.text() == "recovered\n"
        assert result.exit_code == 0
        fresh.close()
    finally:
        executor.close_session(kept)
        other.remove(force=True)
        with_stray = containers(docker_engine, "sess-stray")
        for cid in with_stray:
            docker_engine.api.remove_container(cid, force=True)


def test_workers_sharing_an_id_keep_their_own_containers(
        executor: DockerExecutor, workdir: Path, tmp_path: Path,
        docker_engine: docker.DockerClient) -> None:
    """Two workers with one id on one engine (two grids, or two test runs side by side):
    each one's orphan clean-up removes only the containers of its own state dir."""
    first = DockerExecutor(executor.config, worker_id=WORKER_ID, state_dir=tmp_path / "a")
    second = DockerExecutor(executor.config, worker_id=WORKER_ID, state_dir=tmp_path / "b")
    mine = first.open_session(SessionSpec("sess-twin", workdir, "carol"))
    try:
        assert second.cleanup_orphans(set()) == 0
        assert containers(docker_engine, "sess-twin") == [container_of(mine)]
        result, out = run(first, mine, "echo still here")
        assert (result.exit_code, out.text()) == (0, "still here\n")
    finally:
        first.close_session(mine)
        first.close()
        second.close()


def test_refusals(executor: DockerExecutor, workdir: Path) -> None:
    with pytest.raises(ExecutorError, match="not on this worker"):
        executor.open_session(SessionSpec("sess-x", workdir, "eve", image="xcloud-nope:1"))
    with pytest.raises(ExecutorError, match="network"):
        executor.open_session(SessionSpec("sess-x", workdir, "eve", network=True))
    strict = DockerExecutor(WorkerConfig(docker_image=BUSYBOX,
                                         docker_allow_image_override=False),
                            worker_id=WORKER_ID)
    with pytest.raises(ExecutorError, match="not allowed"):
        strict.open_session(SessionSpec("sess-x", workdir, "eve", image=DEBIAN))


def test_capabilities(executor: DockerExecutor) -> None:
    caps = executor.capabilities()
    assert caps.engine is not None
    assert caps.engine.version
    assert caps.engine.api_version
    assert BUSYBOX in caps.engine.images
    assert caps.security_boundary is True
    assert caps.isolation == "container"
    assert caps.limits == {"cpus", "memory_bytes", "pids"}
    assert caps.available
    assert caps.default_image == BUSYBOX
    assert caps.network is False


def test_module_does_not_import_the_sdk() -> None:
    code = ("import sys, worker.executors.docker as d; "
            "d.DockerExecutor(worker_id='w'); "
            "sys.exit('docker' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    # Nor does building it through the registry, or fingerprinting it (the caps path).
    code = ("import sys, pathlib; from broker.config import WorkerConfig; "
            "from worker.executors import ExecutorContext, fingerprint, make_executor; "
            "fingerprint('docker', WorkerConfig()); "
            "make_executor('docker', ExecutorContext(WorkerConfig(), pathlib.Path('.'), 'w')); "
            "sys.exit('docker' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------- the Debian image


def test_debian_image_python_oom_and_tini(executor: DockerExecutor, workdir: Path,
                                          docker_image: Callable[[str], str]) -> None:
    docker_image(DEBIAN)
    handle = executor.open_session(SessionSpec("sess-debian", workdir, "dave",
                                               Limits(memory_bytes=128 * MIB), image=DEBIAN))
    try:
        result, out = run(executor, handle,
                          "cat /proc/1/cmdline | tr '\\0' ' '; echo; id -un; "
                          "python3 -c 'import sys; print(sys.version_info[:2])'")
        assert result.exit_code == 0, out.text("stderr")
        pid1, user, version = out.text().splitlines()
        assert pid1.startswith("tini -s -- sleep")
        assert user == "xcloud"
        assert version == "(3, 11)"
        result, out = run(executor, handle, 'python3 -c "x = bytearray(2**31)"')
        assert result.oom_killed, (result, out.parts)
        handle2, out2 = start(executor, handle, "echo go; sleep 30")
        wait_for(lambda: "go" in out2.text(), timeout=10, message="command started")
        executor.signal(handle2, signal.SIGINT)
        interrupted = executor.wait(handle2, timeout=5)
        assert interrupted is not None
        assert interrupted.signal == signal.SIGINT
    finally:
        executor.close_session(handle)
