"""The executor contract: what every driver does the same, run unchanged over ``process``
and ``docker`` (the ``executor_kind`` fixture, tests/fixtures/backends.py).

Each driver is built the way the worker builds it, through the registry
(``make_executor(kind, ExecutorContext)``), and driven only through the interface of
worker/executors/base.py. What a command sees of its work dir differs (the host path for
``process``, the bind mount ``/work`` for ``docker``): ``Driver.seen`` says which.
Driver-specific behaviour (hardening, OOM reports, rlimits, task records) stays in
tests/test_process_executor.py and tests/test_docker_executor.py.

At the end of every test the harness closes the sessions it opened and checks that
nothing of them is left: no process carrying their markers, no container labelled with
the test's worker id.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.config import WorkerConfig
from tests.executors.harness import Output, marked_processes, run, start
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from worker.executors import (
    Executor,
    ExecutorCapabilities,
    ExecutorContext,
    ExecutorError,
    fingerprint,
    make_executor,
)
from worker.executors.base import (
    DriverState,
    HandleError,
    Limits,
    SessionHandle,
    SessionSpec,
    TaskHandle,
    WorkdirAccess,
)
from worker.executors.registry import workdir_access
from worker.workdir_access import Handover

MIB = 1024 * 1024


@dataclass
class Driver:
    """One driver under test, and what the test made with it."""

    kind: str
    context: ExecutorContext
    root: Path
    engine: Any = None  # docker.DockerClient for the docker driver
    made: list[Executor] = field(default_factory=list)
    opened: list[tuple[Executor, SessionHandle]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.executor = self.fresh()

    def fresh(self) -> Executor:
        """A new executor on the same state and worker id: a restarted worker's."""
        ex = make_executor(self.kind, self.context)
        self.made.append(ex)
        return ex

    def open(self, rid: str | None = None, limits: Limits | None = None,
             ex: Executor | None = None) -> SessionHandle:
        rid = rid or f"r-{uuid.uuid4().hex[:8]}"
        ex = ex or self.executor
        session = ex.open_session(SessionSpec(rid, self.root / "sessions" / rid / "work",
                                              "alice", limits=limits or Limits()))
        self.opened.append((ex, session))
        return session

    def seen(self, session: SessionHandle) -> str:
        """The work dir as the session's commands see it."""
        return "/work" if self.kind == "docker" else session.workdir

    def alive(self, session_id: str) -> bool:
        """Does anything of session ``session_id`` still run?"""
        if self.kind == "docker":
            return bool(self.containers(session_id))
        return bool(marked_processes(self.root, session_id))

    def containers(self, session_id: str | None = None) -> list[str]:
        labels = [f"xcloud.worker={self.context.worker_id}"]
        if session_id is not None:
            labels.append(f"xcloud.session={session_id}")
        found = self.engine.api.containers(all=True, filters={"label": labels})
        return [str(c["Id"]) for c in found]

    def finish(self) -> None:
        """Close what the test opened, then check that nothing is left."""
        for ex, session in self.opened:
            ex.close_session(session)
        for ex in self.made:
            ex.close()
        if self.kind == "docker":
            leaked = self.containers()
            for cid in leaked:
                self.engine.api.remove_container(cid, force=True)
            assert not leaked, f"containers left behind: {leaked}"
        wait_for(lambda: not marked_processes(self.root), timeout=10,
                 message="a test left processes running")


@pytest.fixture
def driver(executor_kind: str, tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[Driver]:
    config = WorkerConfig(docker_image=BUSYBOX_IMAGE, docker_memory_bytes=64 * MIB)
    context = ExecutorContext(config, tmp_path / "state",
                              worker_id=f"test-contract-{uuid.uuid4().hex[:8]}",
                              kill_grace_s=1.0)
    engine = request.getfixturevalue("docker_engine") if executor_kind == "docker" else None
    d = Driver(executor_kind, context, tmp_path, engine)
    yield d
    d.finish()


# ------------------------------------------------------------------------ the driver


def test_built_through_the_registry_and_fingerprinted(driver: Driver) -> None:
    ex = driver.executor
    assert ex.name == driver.kind
    caps = ex.capabilities()
    assert isinstance(caps, ExecutorCapabilities)
    assert caps.name == driver.kind
    assert caps.available, caps.error
    assert caps.security_boundary == (caps.isolation == "container")
    assert caps.limits <= {"cpus", "memory_bytes", "pids"}
    assert "memory_bytes" in caps.limits
    assert caps.gpus in ("env", "devices")
    assert fingerprint(driver.kind, driver.context.config).name == driver.kind


def test_open_session_is_idempotent(driver: Driver) -> None:
    session = driver.open("r1")
    again = driver.open("r1")
    assert again.workdir == session.workdir
    assert Path(session.workdir).is_dir()
    assert session.executor == driver.kind
    assert session.session_id == "r1"
    assert session.driver_state.version == driver.executor.STATE_VERSION
    assert SessionHandle.from_dict(session.to_dict()) == session  # JSON-able, round trips


def test_workdir_access_says_how_commands_see_the_work_dir(driver: Driver) -> None:
    """The driver's ``workdir_access`` (read from its own state, through the registry as
    file transfers read it) names the path commands see, and handing a file the worker
    wrote over as it says lets the command's user change it."""
    ex = driver.executor
    session = driver.open()
    access = workdir_access(session)
    assert isinstance(access, WorkdirAccess)
    assert access == type(ex).workdir_access(session)
    result, out = run(ex, session, "pwd; id -u; id -g")
    assert result.exit_code == 0
    pwd, uid, gid = out.text().split()
    assert pwd == (access.mount or session.workdir) == driver.seen(session)
    if access.uid is not None:
        assert (int(uid), int(gid)) == (access.uid, access.gid)
    handed = Path(session.workdir) / "handed"
    handed.write_text("worker\n")
    handed.chmod(0o644)
    Handover(uid=access.uid, gid=access.gid, open=access.open).apply(str(handed))
    result, _ = run(ex, session, "echo command >> handed")
    assert result.exit_code == 0
    assert handed.read_text() == "worker\ncommand\n"
    # A state this driver cannot read hands nothing over (and never raises).
    future = SessionHandle(session.session_id, session.executor, session.workdir,
                           DriverState(99, {"anything": 1}))
    assert workdir_access(future) == WorkdirAccess(mount=access.mount)


# -------------------------------------------------------------------------- commands


def test_stdout_stderr_and_exit_code(driver: Driver) -> None:
    session = driver.open()
    result, out = run(driver.executor, session, "echo hi; echo err >&2; echo more; exit 3")
    assert result.exit_code == 3
    assert result.signal is None
    assert not result.oom_killed
    assert out.of("stdout") == b"hi\nmore\n"
    assert out.of("stderr") == b"err\n"
    assert result.duration_s >= 0


def test_output_arrives_while_the_command_runs(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    handle, out = start(ex, session,
                        "echo first; while [ ! -e go ]; do sleep 0.01; done; echo second")
    wait_for(lambda: "first" in out.text(), timeout=10, message="first line streamed")
    assert ex.wait(handle, timeout=0) is None  # still running: it waits for us
    (Path(session.workdir) / "go").touch()
    result = ex.wait(handle, timeout=10)
    assert result is not None
    assert result.exit_code == 0
    assert out.text() == "first\nsecond\n"


def test_pipes_quotes_redirections_and_env(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    result, out = run(ex, session, "printf 'a b\\n' | tr a-z A-Z")
    assert (result.exit_code, out.of("stdout")) == (0, b"A B\n")
    result, out = run(ex, session, 'echo "x  y" > f.txt; cat < f.txt; echo "$0" >&2')
    assert out.of("stdout") == b"x  y\n"
    assert (Path(session.workdir) / "f.txt").read_text() == "x  y\n"
    cmd = ("""printf '%s\\n' "b b" 'a"q' | sort | tr a-z A-Z; """
           """echo "$GREETING" '$GREETING' > g.txt; cat < g.txt""")
    result, out = run(ex, session, cmd, env={"GREETING": "hi there"})
    assert result.exit_code == 0, out.text("stderr")
    assert out.text() == 'A"Q\nB B\nhi there $GREETING\n'
    assert (Path(session.workdir) / "g.txt").read_text() == "hi there $GREETING\n"


def test_exit_status_is_kept_through_the_cwd_trap(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    assert run(ex, session, "false")[0].exit_code == 1
    assert run(ex, session, "true")[0].exit_code == 0
    assert run(ex, session, "(exit 7)")[0].exit_code == 7
    assert run(ex, session, "sh -c 'exit 9'; exit $?")[0].exit_code == 9
    assert run(ex, session, "if then fi")[0].exit_code == 2  # a syntax error


def test_exit_128_plus_n_without_a_signal_stays_an_exit_code(driver: Driver) -> None:
    result, _ = run(driver.executor, driver.open(), "exit 130")
    assert result.exit_code == 130
    assert result.signal is None


def test_cd_persists_between_commands(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    seen = driver.seen(session)
    result, _ = run(ex, session, "mkdir -p 'd e/f'; cd 'd e/f'; echo x > here; exit 4")
    assert result.exit_code == 4
    _, out = run(ex, session, "pwd; cat here")
    assert out.text() == f"{seen}/d e/f\nx\n"
    assert (Path(session.workdir) / "d e" / "f" / "here").read_text() == "x\n"
    run(ex, session, "cd ..")
    _, out = run(ex, session, "pwd")
    assert out.text().rstrip("\n").endswith("/d e")
    run(ex, session, f"cd {seen}")
    assert run(ex, session, "pwd")[1].text() == f"{seen}\n"
    run(ex, session, "cd 'd e'")
    # a directory that disappeared: back to the work dir, not an error
    run(ex, session, f"rm -rf '{seen}/d e'")
    result, out = run(ex, session, "pwd")
    assert result.exit_code == 0
    assert out.text() == f"{seen}\n"


def test_concurrent_commands_in_one_session(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    slow, slow_out = start(ex, session,
                           "echo waiting; while [ ! -e go2 ]; do sleep 0.01; done")
    wait_for(lambda: "waiting" in slow_out.text(), timeout=10, message="slow one started")
    result, out = run(ex, session, "echo quick")
    assert result.exit_code == 0
    assert out.text() == "quick\n"
    assert ex.wait(slow, timeout=0) is None
    (Path(session.workdir) / "go2").touch()
    result2 = ex.wait(slow, timeout=10)
    assert result2 is not None
    assert result2.exit_code == 0


def test_environment_is_clean_and_marked(driver: Driver,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_OF_THE_WORKER", "x")
    ex = driver.executor
    session = driver.open("r1")
    _, out = run(ex, session, "env", env={"FOO": "bar baz", "XCLOUD_EXEC_ID": "fake"})
    env = dict(line.split("=", 1) for line in out.text().splitlines() if "=" in line)
    assert "SECRET_OF_THE_WORKER" not in env
    assert env["FOO"] == "bar baz"
    assert env["HOME"] == driver.seen(session)
    assert env["TERM"] == "dumb"
    assert env["XCLOUD_RESERVATION"] == "r1"
    assert env["XCLOUD_EXEC_ID"] != "fake"
    with pytest.raises(ExecutorError, match="environment"):
        run(ex, session, "true", env={"BAD=NAME": "x"})
    with pytest.raises(ExecutorError, match="environment"):
        start(ex, session, "true", env={"A=B": "x"})


def test_stdin_is_empty(driver: Driver) -> None:
    _result, out = run(driver.executor, driver.open(), "cat; echo done")
    assert out.of("stdout") == b"done\n"


def test_large_output_is_complete(driver: Driver) -> None:
    result, out = run(driver.executor, driver.open(),
                      "head -c 5000000 /dev/zero; echo tail >&2")
    assert result.exit_code == 0
    assert out.of("stdout") == bytes(5_000_000)
    assert out.of("stderr") == b"tail\n"


def test_wait_covers_background_children_holding_the_pipe(driver: Driver) -> None:
    result, out = run(driver.executor, driver.open(), "(sleep 0.3; echo late) & echo early")
    assert out.of("stdout") == b"early\nlate\n"
    assert result.exit_code == 0


# ------------------------------------------------------------- signals, stop, timeouts


def test_ctrl_c_interrupts_the_whole_pipeline(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    # "ready" comes from the pipeline's first stage once forked, so the INT cannot land
    # while bash forks it (a child that has not exec'd yet swallows it: a bash race)
    handle, out = start(ex, session, "sh -c 'echo ready; exec sleep 30' | cat")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    ex.signal(handle, signal.SIGINT)
    result = ex.wait(handle, 5)
    assert result is not None, "INT did not stop sleep 30"
    assert result.signal == signal.SIGINT
    assert result.exit_code is None
    assert result.duration_s < 5


def test_signal_right_after_start(driver: Driver) -> None:
    ex = driver.executor
    handle, _ = start(ex, driver.open(), "sleep 30")
    assert handle.pid  # start() returns once the command exists
    ex.signal(handle, signal.SIGTERM)
    result = ex.wait(handle, timeout=5)
    assert result is not None
    assert result.signal == signal.SIGTERM


def test_stop_escalates_to_kill(driver: Driver) -> None:
    ex = driver.executor
    # TERM ignored by the shell and (inherited) by sleep: stop() must KILL.
    handle, out = start(ex, driver.open(), "trap '' TERM; echo ready; sleep 30")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    result = ex.stop(handle, grace_s=0.3)
    assert result is not None
    assert result.signal == signal.SIGKILL
    assert not result.oom_killed


def test_timeout_path_wait_then_stop(driver: Driver) -> None:
    ex = driver.executor
    # What the exec layer does at a command's timeout: wait(timeout) -> None -> stop().
    handle, _ = start(ex, driver.open(), "sleep 30", timeout_s=0.3)
    assert ex.wait(handle, timeout=0.3) is None
    result = ex.stop(handle, grace_s=5)
    assert result is not None
    assert result.signal == signal.SIGTERM
    assert result.duration_s < 10
    assert ex.stop(handle, grace_s=5) == result  # stopping a finished task: no-op


def test_unknown_and_duplicate_tasks(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open("r1")
    with pytest.raises(ExecutorError):
        ex.wait(TaskHandle("nope", driver.kind, "r1"), 0.1)
    handle, _out = start(ex, session, "sleep 30", task_id="dup")
    with pytest.raises(ExecutorError):
        start(ex, session, "true", task_id="dup")
    ex.signal(handle, signal.SIGKILL)
    assert ex.wait(handle, 5) is not None


# --------------------------------------------------------------------------- limits


def test_memory_limit_stops_a_hog_and_the_session_survives(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open(limits=Limits(memory_bytes=64 * MIB))
    # tail keeps the last lines; /dev/zero has no newline, so its buffer grows until
    # the limit: an allocation fails (process: RLIMIT_AS) or the OOM killer strikes
    # (docker: the container's memory cgroup).
    result, out = run(ex, session, "tail /dev/zero")
    assert not result.ok, (result, out.parts)
    result, out = run(ex, session, "echo alive")
    assert result.exit_code == 0
    assert out.text() == "alive\n"


# ------------------------------------------------------------------------- sessions


def test_close_session_stops_its_commands(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    handle, out = start(ex, session, "setsid sleep 60 >/dev/null 2>&1 & echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    ex.close_session(session)
    result = ex.wait(handle, 10)
    assert result is not None
    assert result.signal == signal.SIGTERM  # TERM first
    wait_for(lambda: not driver.alive(session.session_id), message="something survived")


def test_close_session_kills_what_ignores_term(driver: Driver) -> None:
    ex = driver.executor
    session = driver.open()
    handle, out = start(ex, session, "trap '' TERM; echo up; sleep 30")
    wait_for(lambda: out.of("stdout") == b"up\n", message="command did not start")
    ex.close_session(session)
    result = ex.wait(handle, timeout=10)
    assert result is not None
    assert result.signal == signal.SIGKILL
    wait_for(lambda: not driver.alive(session.session_id), message="something survived")


def test_restart_recovers_sessions_and_cleans_orphans(driver: Driver) -> None:
    first = driver.executor
    kept = driver.open("kept")
    stray = driver.open("stray")
    handle, out = start(first, kept, "echo ready; sleep 60")
    stray_task, stray_out = start(first, stray, "echo ready; sleep 60")
    wait_for(lambda: out.text() == "ready\n" and stray_out.text() == "ready\n",
             message="commands did not start")
    gone = driver.open("gone")
    first.close_session(gone)  # its resources are gone; the handle stays behind
    driver.opened.remove((first, gone))
    # A restarted worker: a fresh executor on the same state and worker id, told which
    # sessions the worker still has (cleanup first, as the exec layer does).
    second = driver.fresh()
    second.cleanup_orphans(keep={"kept", "gone"})
    alive = second.recover([kept, gone])
    assert [h.session_id for h in alive] == ["kept"]
    # The previous run's commands cannot be re-attached: none survives, kept or not.
    for task, ex in ((handle, first), (stray_task, first)):
        assert ex.wait(task, 10) is not None, "an orphaned command survived"
    wait_for(lambda: not driver.alive("stray"), message="the stray session survived")
    assert Path(kept.workdir).is_dir()  # the kept session itself survives
    result, out = run(second, alive[0], "cat /dev/null; echo recovered")
    assert out.text() == "recovered\n"
    assert result.exit_code == 0
    driver.opened.remove((first, stray))
    driver.opened.remove((first, kept))
    driver.opened.append((second, alive[0]))


def test_unreadable_handles_are_not_recovered_but_cleaned_up(driver: Driver) -> None:
    first = driver.executor
    sessions = [driver.open("old-layout"), driver.open("future")]
    tasks = []
    for session in sessions:
        task, out = start(first, session, "echo ready; sleep 60")

        def ready(o: Output = out) -> bool:
            return o.text() == "ready\n"

        wait_for(ready, message="command did not start")
        tasks.append(task)
    # As persisted by the previous layout (docker fields and ``extra``, no driver
    # state), and by a newer worker (a state layout this one does not know).
    old = {k: v for k, v in sessions[0].to_dict().items() if k != "driver_state"}
    old.update({"container_id": "0" * 64, "extra": {"limits": {}, "recreated": 0}})
    future = sessions[1].to_dict()
    future["driver_state"] = {"version": 99, "data": {"anything": ["at", "all"]}}
    handles = [SessionHandle.from_dict(old), SessionHandle.from_dict(future)]
    assert [h.driver_state.version for h in handles] == [0, 99]
    second = driver.fresh()
    second.cleanup_orphans(keep={"old-layout", "future"})
    assert second.recover(handles) == []
    for handle in handles:
        with pytest.raises(ExecutorError):
            start(second, handle, "true")
        second.close_session(handle)  # cleans up by session id, never crashes
    for task in tasks:
        assert first.wait(task, 10) is not None, "a command of an unreadable handle survived"
    for session in sessions:
        def gone(s: SessionHandle = session) -> bool:
            return not driver.alive(s.session_id)

        wait_for(gone, message=f"session {session.session_id} survived")
    for bad in ({"executor": driver.kind}, ["not", "a", "handle"],
                {"session_id": "x", "executor": driver.kind, "workdir": 7}):
        with pytest.raises(HandleError):
            SessionHandle.from_dict(bad)
