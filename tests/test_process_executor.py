"""The ``process`` executor on its own: what only this driver does (rlimits, the host work
dir, task records, markers). What every driver does is in tests/executors/."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.executors.harness import marked_processes, run, start
from tests.fixtures.services import wait_for
from worker.executors.base import (
    DriverState,
    ExecutorError,
    Limits,
    SessionHandle,
    SessionSpec,
)
from worker.executors.process import ProcessExecutor


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


def test_work_dir_is_private(executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    assert (Path(session.workdir).stat().st_mode & 0o777) == 0o700
    caps = executor.capabilities()
    assert caps.security_boundary is False
    assert caps.isolation == "none"
    assert caps.limits == {"memory_bytes", "pids"}


def test_shell_error_line_numbers_are_kept(executor: ProcessExecutor, tmp_path: Path) -> None:
    # The prelude is on the command's own line: a syntax error names line 1.
    session = open_session(executor, tmp_path)
    syntax = run(executor, session, "if then fi")
    assert syntax[0].exit_code == 2
    assert b"1:" in syntax[1].of("stderr")


def test_a_command_killing_itself_is_reported_as_a_signal(executor: ProcessExecutor,
                                                          tmp_path: Path) -> None:
    # The shell's own death by a signal is a signal here (docker reports 128+N as an
    # exit code unless the driver sent that signal).
    session = open_session(executor, tmp_path)
    result, _ = run(executor, session, "kill -TERM $$")
    assert (result.exit_code, result.signal) == (None, signal.SIGTERM)


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


def test_close_session_kills_escaped_processes_and_removes_the_dir(
        executor: ProcessExecutor, tmp_path: Path) -> None:
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session,
                        "setsid sleep 60 >/dev/null 2>&1 & echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    wait_for(lambda: len(marked_processes(tmp_path)) >= 3, message="processes not seen")
    executor.close_session(session)
    result = executor.wait(handle, 5)
    assert result is not None
    assert result.signal == signal.SIGTERM
    assert not Path(session.workdir).exists()
    wait_for(lambda: not marked_processes(tmp_path), message="escaped process survived")


def test_close_session_of_an_unreadable_handle_leaves_the_dir(executor: ProcessExecutor,
                                                              tmp_path: Path) -> None:
    # Its processes are found by their markers; its path is not trusted to delete.
    session = open_session(executor, tmp_path)
    handle, out = start(executor, session, "echo ready; sleep 60")
    wait_for(lambda: out.of("stdout") == b"ready\n", message="command did not start")
    stale = SessionHandle(session.session_id, "process", session.workdir)  # layout 0
    executor.close_session(stale)
    result = executor.wait(handle, 10)
    assert result is not None
    assert result.signal == signal.SIGTERM
    assert Path(session.workdir).is_dir()


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
    assert result is not None
    assert result.signal == signal.SIGKILL
    assert not list((state / "process").glob("*.json"))
    assert Path(session.workdir).is_dir()  # the session itself survives
    gone = SessionHandle("r2", "process", str(tmp_path / "nowhere"),
                         driver_state=DriverState(ProcessExecutor.STATE_VERSION, {}))
    assert second.recover([gone]) == []


def test_missing_workdir(executor: ProcessExecutor, tmp_path: Path) -> None:
    ghost = SessionHandle("r9", "process", str(tmp_path / "missing"),
                          driver_state=DriverState(ProcessExecutor.STATE_VERSION, {}))
    with pytest.raises(ExecutorError):
        start(executor, ghost, "true")
