"""The ``process`` executor on its own: real shells, real process groups, no broker."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

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
from worker.executors.process import ProcessExecutor


@dataclass
class Output:
    parts: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stream: str, data: bytes) -> None:
        with self.lock:
            self.parts.append((stream, data))

    def of(self, stream: str) -> bytes:
        with self.lock:
            return b"".join(d for s, d in self.parts if s == stream)


def marked_processes(root: Path) -> list[psutil.Process]:
    """Live processes started by an executor whose work dirs are under ``root``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("XCLOUD_WORKDIR", "").startswith(str(root)):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path) -> Iterator[None]:
    yield
    wait_for(lambda: not marked_processes(tmp_path), timeout=10,
             message="a test left processes running")


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(tmp_path / "state", kill_grace_s=1.0)
    yield ex
    ex.close()


def open_session(ex: ProcessExecutor, tmp_path: Path, rid: str = "r1",
                 limits: Limits | None = None) -> SessionHandle:
    return ex.open_session(SessionSpec(rid, tmp_path / "sessions" / rid / "work", "alice",
                                       limits=limits or Limits()))


def run(ex: ProcessExecutor, session: SessionHandle, command: str,
        env: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[ExitResult, Output]:
    out = Output()
    handle = ex.start(TaskSpec(task_id=uuid.uuid4().hex[:12], command=command, session=session,
                               env=env or {}), out)
    result = ex.wait(handle, timeout)
    assert result is not None, f"{command!r} did not finish in {timeout}s"
    return result, out


def start(ex: ProcessExecutor, session: SessionHandle, command: str,
          task_id: str | None = None) -> tuple[TaskHandle, Output]:
    out = Output()
    handle = ex.start(TaskSpec(task_id=task_id or uuid.uuid4().hex[:12], command=command,
                               session=session), out)
    return handle, out


def test_work_dir_is_private(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    assert (Path(session.workdir).stat().st_mode & 0o777) == 0o700
    assert executor.capabilities()["security_boundary"] is False
    again = open_session(executor, tmp_path)  # idempotent
    assert again.workdir == session.workdir


def test_stdout_stderr_and_exit_code(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, out = run(executor, session, "echo hi; echo err >&2; exit 3")
    assert result.exit_code == 3 and result.signal is None
    assert out.of("stdout") == b"hi\n"
    assert out.of("stderr") == b"err\n"
    assert result.duration_s >= 0


def test_pipes_quotes_and_redirections(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, out = run(executor, session, "printf 'a b\\n' | tr a-z A-Z")
    assert (result.exit_code, out.of("stdout")) == (0, b"A B\n")
    result, out = run(executor, session, 'echo "x  y" > f.txt; cat < f.txt; echo "$0" >&2')
    assert out.of("stdout") == b"x  y\n"
    assert (Path(session.workdir) / "f.txt").read_text() == "x  y\n"


def test_exit_status_is_kept_through_the_cwd_trap(executor: ProcessExecutor,
                                                  tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    assert run(executor, session, "false")[0].exit_code == 1
    assert run(executor, session, "true")[0].exit_code == 0
    assert run(executor, session, "(exit 7)")[0].exit_code == 7
    assert run(executor, session, "sh -c 'exit 9'; exit $?")[0].exit_code == 9
    syntax = run(executor, session, "if then fi")
    assert syntax[0].exit_code == 2 and b"1:" in syntax[1].of("stderr")  # line numbers kept


def test_cd_persists_between_commands(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, _ = run(executor, session, "mkdir -p 'd e/f'; cd 'd e/f'; exit 4")
    assert result.exit_code == 4
    _, out = run(executor, session, "pwd")
    assert out.of("stdout").decode().rstrip("\n") == os.path.join(session.workdir, "d e/f")
    run(executor, session, "cd ..")
    _, out = run(executor, session, "pwd")
    assert out.of("stdout").decode().rstrip("\n").endswith("/d e")
    # a directory that disappeared: back to the work dir, not an error
    run(executor, session, f"rm -rf '{session.workdir}/d e'")
    result, out = run(executor, session, "pwd")
    assert result.exit_code == 0
    assert out.of("stdout").decode().rstrip("\n") == session.workdir


def test_signals_are_reported_as_signals(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, _ = run(executor, session, "kill -TERM $$")
    assert (result.exit_code, result.signal) == (None, signal.SIGTERM)
    handle, out = start(executor, session, "echo ready; sleep 30 | cat")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    executor.signal(handle, signal.SIGINT)
    interrupted = executor.wait(handle, 5)
    assert interrupted is not None and interrupted.signal == signal.SIGINT


def test_environment_is_clean_and_marked(executor: ProcessExecutor, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_OF_THE_WORKER", "x")
    session = open_session(executor, tmp_path)
    _, out = run(executor, session, "env", env={"FOO": "bar baz", "XCLOUD_EXEC_ID": "fake"})
    env = dict(line.split("=", 1) for line in out.of("stdout").decode().splitlines())
    assert "SECRET_OF_THE_WORKER" not in env
    assert env["FOO"] == "bar baz"
    assert env["HOME"] == session.workdir and env["TERM"] == "dumb"
    assert env["XCLOUD_RESERVATION"] == "r1" and env["XCLOUD_EXEC_ID"] != "fake"
    with pytest.raises(ExecutorError):
        run(executor, session, "true", env={"BAD=NAME": "x"})


def test_stdin_is_empty(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    _result, out = run(executor, session, "cat; echo done")
    assert out.of("stdout") == b"done\n"


def test_memory_limit(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path, limits=Limits(memory_bytes=300 * 2**20))
    _result, out = run(executor, session,
                      "python3 -c 'x = bytearray(600 * 2**20)' 2>&1 | tail -1; "
                      "python3 -c 'x = bytearray(20 * 2**20); print(\"small ok\")'")
    assert b"MemoryError" in out.of("stdout")
    assert b"small ok" in out.of("stdout")


def test_pids_limit(executor: ProcessExecutor, tmp_path: Path) -> None:
    mine = len([p for p in psutil.process_iter() if p.uids().real == os.getuid()])
    session = open_session(executor, tmp_path, limits=Limits(pids=mine + 5))
    if os.geteuid() == 0:
        # RLIMIT_NPROC does not bind root (the kernel exempts CAP_SYS_RESOURCE), so as
        # root check that the limit is applied to the command, not that forks fail.
        result, out = run(executor, session, "grep 'Max processes' /proc/self/limits")
        assert result.exit_code == 0
        assert out.of("stdout").split()[2:4] == [str(mine + 5).encode()] * 2
        return
    result, out = run(executor, session,
                      "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 2 & done; wait")
    assert b"fork" in out.of("stderr").lower() or result.exit_code != 0


def test_large_output_is_complete(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, out = run(executor, session, "head -c 5000000 /dev/zero; echo tail >&2")
    assert result.exit_code == 0
    assert out.of("stdout") == bytes(5_000_000) and out.of("stderr") == b"tail\n"


def test_stop_escalates_to_kill(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session, "trap '' TERM; echo ready; sleep 30")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    result = executor.stop(handle, grace_s=0.3)
    assert result is not None and result.signal == signal.SIGKILL


def test_wait_covers_background_children_holding_the_pipe(executor: ProcessExecutor,
                                                          tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    result, out = run(executor, session, "(sleep 0.3; echo late) & echo early")
    assert out.of("stdout") == b"early\nlate\n"
    assert result.exit_code == 0


def test_close_session_kills_everything_and_removes_the_dir(executor: ProcessExecutor,
                                                           tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session,
                        "setsid sleep 60 >/dev/null 2>&1 & echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    wait_for(lambda: len(marked_processes(tmp_path)) >= 3, message="processes not seen")
    executor.close_session(session)
    result = executor.wait(handle, 5)
    assert result is not None and result.signal == signal.SIGTERM
    assert not Path(session.workdir).exists()
    wait_for(lambda: not marked_processes(tmp_path), message="escaped process survived")


def test_cleanup_orphans_of_a_previous_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ProcessExecutor(state)
    session = open_session(first, tmp_path)
    handle, out = start(first, session, "echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    assert list((state / "process").glob("*.json"))
    # A new executor on the same state dir (a restarted worker) finds and kills it.
    second = ProcessExecutor(state)
    assert second.recover([session]) == [session]
    assert second.cleanup_orphans(keep={"r1"}) >= 1
    result = first.wait(handle, 5)
    assert result is not None and result.signal == signal.SIGKILL
    assert not list((state / "process").glob("*.json"))
    assert Path(session.workdir).is_dir()  # the session itself survives
    gone = SessionHandle("r2", "process", str(tmp_path / "nowhere"))
    assert second.recover([gone]) == []


def test_unknown_task_and_missing_workdir(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    with pytest.raises(ExecutorError):
        executor.wait(TaskHandle("nope", "process", "r1"), 0.1)
    ghost = SessionHandle("r9", "process", str(tmp_path / "missing"))
    with pytest.raises(ExecutorError):
        start(executor, ghost, "true")
    handle, _out = start(executor, session, "sleep 30", task_id="dup")
    with pytest.raises(ExecutorError):
        start(executor, session, "true", task_id="dup")
    executor.signal(handle, signal.SIGKILL)
    assert executor.wait(handle, 5) is not None
