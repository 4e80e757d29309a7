"""The docker executor against the real engine (worker/executors/docker.py).

Most tests share one busybox session container (fast); a few open their own. Hardening
is checked from inside the container, the way a hostile command would see it. Every
container carries the label ``xcloud.worker=<this module's worker id>``, and the module
fixture fails if one is left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from broker.config import WorkerConfig
from tests.fixtures.services import wait_for
from worker.executors.base import (
    ExecutorError,
    ExitResult,
    Limits,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    TaskSpec,
)
from worker.executors.docker import LABEL_SESSION, LABEL_WORKER, DockerExecutor

if TYPE_CHECKING:
    import docker

pytestmark = [pytest.mark.docker]

BUSYBOX = "xcloud-busybox:latest"
DEBIAN = "xcloud-base:bookworm"
MIB = 1024 * 1024
WORKER_ID = f"test-dx-{uuid.uuid4().hex[:8]}"


@dataclass
class Output:
    """Collects what a task streamed, in arrival order."""

    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stream: str, data: bytes) -> None:
        with self.lock:
            self.chunks.append((stream, data))

    def text(self, stream: str = "stdout") -> str:
        with self.lock:
            return b"".join(d for s, d in self.chunks if s == stream).decode()


def start(ex: DockerExecutor, session: SessionHandle, command: str,
          **kw: object) -> tuple[TaskHandle, Output]:
    out = Output()
    spec = TaskSpec(task_id=f"t-{uuid.uuid4().hex[:10]}", command=command, session=session,
                    **kw)  # type: ignore[arg-type]
    return ex.start(spec, out), out


def run(ex: DockerExecutor, session: SessionHandle, command: str,
        **kw: object) -> tuple[ExitResult, Output]:
    handle, out = start(ex, session, command, **kw)
    result = ex.wait(handle, timeout=30)
    assert result is not None, f"{command!r} did not finish"
    return result, out


def containers(engine: docker.DockerClient, session_id: str | None = None) -> list[str]:
    labels = [f"{LABEL_WORKER}={WORKER_ID}"]
    if session_id:
        labels.append(f"{LABEL_SESSION}={session_id}")
    return [c.id for c in engine.containers.list(all=True, filters={"label": labels})]


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


# ---------------------------------------------------------------------------- commands


def test_streams_stdout_and_stderr_with_exit_code(executor: DockerExecutor,
                                                  session: SessionHandle) -> None:
    result, out = run(executor, session, "echo out; echo err >&2; echo more; exit 3")
    assert result.exit_code == 3 and result.signal is None and not result.oom_killed
    assert out.text("stdout") == "out\nmore\n"
    assert out.text("stderr") == "err\n"


def test_output_arrives_while_the_command_runs(executor: DockerExecutor,
                                              session: SessionHandle) -> None:
    go = Path(session.workdir) / "go"
    handle, out = start(executor, session,
                        "echo first; while [ ! -e /work/go ]; do sleep 0.01; done; echo second")
    wait_for(lambda: "first" in out.text(), timeout=10, message="first line streamed")
    assert executor.wait(handle, timeout=0) is None  # still running: it waits for us
    go.touch()
    result = executor.wait(handle, timeout=10)
    assert result is not None and result.exit_code == 0
    assert out.text() == "first\nsecond\n"
    go.unlink()


def test_pipes_quotes_redirections_and_env(executor: DockerExecutor,
                                           session: SessionHandle) -> None:
    cmd = ("""printf '%s\\n' "b b" 'a"q' | sort | tr a-z A-Z; """
           """echo "$GREETING" '$GREETING' > f.txt; cat < f.txt""")
    result, out = run(executor, session, cmd, env={"GREETING": "hi there"})
    assert result.exit_code == 0, out.text("stderr")
    assert out.text() == 'A"Q\nB B\nhi there $GREETING\n'
    assert (Path(session.workdir) / "f.txt").read_text() == "hi there $GREETING\n"


def test_cwd_persists_between_commands(executor: DockerExecutor,
                                       session: SessionHandle) -> None:
    result, _ = run(executor, session, "mkdir -p sub/dir && cd sub/dir && echo x > here")
    assert result.exit_code == 0
    result, out = run(executor, session, "pwd; cat here")
    assert out.text() == "/work/sub/dir\nx\n"
    run(executor, session, "cd /work")
    assert run(executor, session, "pwd")[1].text() == "/work\n"
    assert (Path(session.workdir) / "sub" / "dir" / "here").read_text() == "x\n"


def test_concurrent_commands_in_one_session(executor: DockerExecutor,
                                            session: SessionHandle) -> None:
    slow, slow_out = start(executor, session,
                           "echo waiting; while [ ! -e /work/go2 ]; do sleep 0.01; done")
    wait_for(lambda: "waiting" in slow_out.text(), timeout=10, message="slow one started")
    result, out = run(executor, session, "echo quick")
    assert result.exit_code == 0 and out.text() == "quick\n"
    assert executor.wait(slow, timeout=0) is None
    (Path(session.workdir) / "go2").touch()
    result2 = executor.wait(slow, timeout=10)
    assert result2 is not None and result2.exit_code == 0


def test_invalid_env_name_is_refused(executor: DockerExecutor, session: SessionHandle) -> None:
    with pytest.raises(ExecutorError, match="environment"):
        start(executor, session, "true", env={"A=B": "x"})


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
    assert "work:writable" in lines and "tmp:writable" in lines
    assert (Path(session.workdir) / "probe").exists()


def test_container_configuration(executor: DockerExecutor, session: SessionHandle,
                                 docker_engine: docker.DockerClient) -> None:
    attrs = docker_engine.api.inspect_container(session.container_id)
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
    assert result.oom_killed, (result, out.chunks)
    assert result.signal == signal.SIGKILL and result.exit_code is None
    # A command that survives losing a process to the OOM killer says so too.
    result, out = run(executor, session, "tail /dev/zero | cat; echo after")
    assert result.oom_killed and result.exit_code == 0, (result, out.chunks)
    assert out.text() == "after\n"
    # The session container survived, and a plain SIGKILL is not an OOM.
    result, out = run(executor, session, "echo alive")
    assert result.exit_code == 0 and out.text() == "alive\n"
    result, _ = run(executor, session, "kill -9 $$")
    assert result.exit_code == 137 and not result.oom_killed


# ---------------------------------------------------------------------- signals and stop


def test_ctrl_c_stops_sleep(executor: DockerExecutor, session: SessionHandle) -> None:
    handle, out = start(executor, session, "echo started; sleep 30 | cat")
    wait_for(lambda: "started" in out.text(), timeout=10, message="command started")
    executor.signal(handle, signal.SIGINT)
    result = executor.wait(handle, timeout=5)
    assert result is not None, "INT did not stop sleep 30"
    assert result.signal == signal.SIGINT and result.exit_code is None
    assert result.duration_s < 5
    # Nothing of it is left in the container.
    _, ps = run(executor, session, "ps | grep -c '[s]leep 30' || true")
    assert ps.text().strip() == "0"


def test_signal_right_after_start(executor: DockerExecutor, session: SessionHandle) -> None:
    handle, _ = start(executor, session, "sleep 30")
    assert handle.pid  # start() returns once the engine has spawned it (host pid)
    executor.signal(handle, signal.SIGTERM)
    result = executor.wait(handle, timeout=5)
    assert result is not None and result.signal == signal.SIGTERM


def test_stop_escalates_to_kill(executor: DockerExecutor, session: SessionHandle) -> None:
    # TERM ignored by the shell and (inherited) by sleep: stop() must KILL.
    handle, out = start(executor, session, "trap '' TERM; echo ready; sleep 30")
    wait_for(lambda: "ready" in out.text(), timeout=10, message="command started")
    result = executor.stop(handle, grace_s=0.5)
    assert result is not None
    assert result.signal == signal.SIGKILL and not result.oom_killed


def test_timeout_path_wait_then_stop(executor: DockerExecutor, session: SessionHandle) -> None:
    # What the exec layer does at a command's timeout: wait(timeout) -> None -> stop().
    handle, _ = start(executor, session, "sleep 30", timeout_s=0.3)
    assert executor.wait(handle, timeout=0.3) is None
    result = executor.stop(handle, grace_s=5)
    assert result is not None and result.signal == signal.SIGTERM
    assert result.duration_s < 10
    assert executor.stop(handle, grace_s=5) == result  # stopping a finished task: no-op


def test_exit_128_plus_n_without_a_signal_stays_an_exit_code(
        executor: DockerExecutor, session: SessionHandle) -> None:
    result, _ = run(executor, session, "exit 130")
    assert result.exit_code == 130 and result.signal is None


# ------------------------------------------------------------------------------ sessions


def test_open_session_is_idempotent_and_close_removes_the_container(
        executor: DockerExecutor, workdir: Path, docker_engine: docker.DockerClient) -> None:
    spec = SessionSpec("sess-close", workdir, "bob", Limits(memory_bytes=32 * MIB, pids=64))
    first = executor.open_session(spec)
    again = executor.open_session(spec)
    assert first.container_id == again.container_id
    assert containers(docker_engine, "sess-close") == [first.container_id]
    host = docker_engine.api.inspect_container(first.container_id)["HostConfig"]
    assert host["Memory"] == 32 * MIB and host["PidsLimit"] == 64
    # The worker's settings are ceilings: asking for more gets the worker's limit.
    greedy = executor.open_session(SessionSpec(
        "sess-greedy", workdir.parent / "greedy", "bob",
        Limits(memory_bytes=2**40, cpus=64.0, pids=10**6)))
    try:
        host = docker_engine.api.inspect_container(greedy.container_id)["HostConfig"]
        assert host["Memory"] == 64 * MIB and host["PidsLimit"] == 256
        assert host["NanoCpus"] == 1_000_000_000
    finally:
        executor.close_session(greedy)
    handle, out = start(executor, first, "echo up; sleep 30")
    wait_for(lambda: "up" in out.text(), timeout=10, message="command started")
    executor.close_session(first)
    assert containers(docker_engine, "sess-close") == []
    result = executor.wait(handle, timeout=10)
    assert result is not None and result.signal == signal.SIGTERM  # TERM first
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
    assert result is not None and result.signal == signal.SIGKILL
    assert result.error == "session closed"
    assert containers(docker_engine, "sess-stubborn") == []
    quick.close()


def test_dead_container_is_recreated_on_next_start(
        executor: DockerExecutor, workdir: Path, docker_engine: docker.DockerClient) -> None:
    handle = executor.open_session(SessionSpec("sess-dead", workdir, "bob"))
    try:
        run(executor, handle, "mkdir -p keep && cd keep && echo kept > f")
        old = handle.container_id
        docker_engine.api.kill(old)  # as if its PID 1 had died
        result, out = run(executor, handle, "pwd; cat f")
        assert result.exit_code == 0, out.text("stderr")
        assert out.text() == "/work/keep\nkept\n"  # the work dir (and cwd) survived
        assert handle.container_id != old and handle.extra["recreated"] == 1
        assert containers(docker_engine, "sess-dead") == [handle.container_id]
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
        assert containers(docker_engine, "sess-keep") == [kept.container_id]
        other.reload()  # another worker's container is none of our business
        # A restarted agent: a fresh executor finds the running session, not a gone one.
        fresh = DockerExecutor(executor.config, worker_id=WORKER_ID)
        gone = SessionHandle("sess-gone", "docker", str(workdir), container_id="0" * 64)
        alive = fresh.recover([SessionHandle("sess-keep", "docker", str(workdir)), gone])
        assert [h.session_id for h in alive] == ["sess-keep"]
        assert alive[0].container_id == kept.container_id
        result, out = run(fresh, alive[0], "echo recovered")
        assert out.text() == "recovered\n" and result.exit_code == 0
        fresh.close()
    finally:
        executor.close_session(kept)
        other.remove(force=True)
        with_stray = containers(docker_engine, "sess-stray")
        for cid in with_stray:
            docker_engine.api.remove_container(cid, force=True)


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
    assert caps["engine"] and caps["api_version"]
    assert BUSYBOX in caps["images"]
    assert caps["security_boundary"] is True


def test_module_does_not_import_the_sdk() -> None:
    code = ("import sys, worker.executors.docker as d; "
            "d.DockerExecutor(worker_id='w'); "
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
        assert user == "xcloud" and version == "(3, 11)"
        result, out = run(executor, handle, 'python3 -c "x = bytearray(2**31)"')
        assert result.oom_killed, (result, out.chunks)
        handle2, out2 = start(executor, handle, "echo go; sleep 30")
        wait_for(lambda: "go" in out2.text(), timeout=10, message="command started")
        executor.signal(handle2, signal.SIGINT)
        result = executor.wait(handle2, timeout=5)
        assert result is not None and result.signal == signal.SIGINT
    finally:
        executor.close_session(handle)
