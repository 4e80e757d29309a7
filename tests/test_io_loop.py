"""The worker's one I/O loop (worker/io_loop.py) and the process executor on it: exits
seen through pidfds, output read with backpressure, no thread per command."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.executors.harness import run, start
from tests.fixtures.leaks import record_thread_starts
from tests.fixtures.services import wait_for
from worker.executors.base import SessionHandle, SessionSpec, TaskSpec
from worker.executors.process import ProcessExecutor
from worker.io_loop import IoLoop
from worker.output import OutputStreamer


@pytest.fixture
def loop() -> Iterator[IoLoop]:
    made = IoLoop("test-io")
    made.hold()
    yield made
    made.release()
    wait_for(lambda: made.thread is None, message="the loop thread did not end")


@pytest.fixture
def executor(tmp_path: Path, loop: IoLoop) -> Iterator[ProcessExecutor]:
    ex = ProcessExecutor(tmp_path / "state", kill_grace_s=1.0, cgroups="off", loop=loop)
    yield ex
    ex.close()


@pytest.fixture
def session(executor: ProcessExecutor, tmp_path: Path) -> SessionHandle:
    return executor.open_session(SessionSpec("r1", tmp_path / "work", "alice"))


@pytest.fixture
def pidfds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids whose exit was watched through a pidfd."""
    seen: list[int] = []
    real = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        seen.append(pid)
        return real(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)  # as worker/io_loop.py calls it
    return seen


def test_the_loop_reaps_an_exit_through_its_pidfd_after_the_pipe_closed(
        loop: IoLoop, pidfds: list[int]) -> None:
    # The child closes its stdout first, then waits for a line: EOF comes before the exit.
    proc = subprocess.Popen(["/bin/sh", "-c", "exec 1>&-; read x; exit 7"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    eof = threading.Event()
    exits: list[tuple[int, threading.Thread]] = []
    exited = threading.Event()

    def readable() -> None:
        if not os.read(proc.stdout.fileno(), 100):  # type: ignore[union-attr]
            reader.remove()
            eof.set()

    def on_exit(code: int) -> None:
        exits.append((code, threading.current_thread()))
        exited.set()

    reader = loop.add_reader(proc.stdout.fileno(), readable)
    loop.watch_exit(proc, on_exit)
    assert eof.wait(10)
    assert not exited.is_set()  # the child still waits for its line
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert exited.wait(10)
    proc.stdout.close()
    assert exits == [(7, loop.thread)]
    assert proc.returncode == 7  # reaped by the loop: no zombie left
    assert pidfds == [proc.pid]


def test_a_grandchild_holding_the_pipe_delays_the_result_until_eof(
        executor: ProcessExecutor, session: SessionHandle, tmp_path: Path,
        pidfds: list[int]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    handle, out = start(executor, session, f"(cat {fifo}) & exit 3")
    task = executor._tasks[(session.session_id, handle.task_id)]
    # The shell is reaped (seen through its pidfd) while the grandchild keeps its stdout.
    wait_for(lambda: task.returncode is not None, message="the shell's exit was not seen")
    assert task.returncode == 3
    assert handle.pid in pidfds
    assert executor.wait(handle, 0) is None  # no result before the pipes' EOF
    with open(fifo, "wb") as writer:
        writer.write(b"late\n")
    result = executor.wait(handle, 10)
    assert result is not None
    assert result.exit_code == 3
    assert out.text() == "late\n"


def test_without_pidfds_a_thread_waits_for_the_exit(
        executor: ProcessExecutor, session: SessionHandle,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:  # noqa: ARG001
        raise OSError(errno.ENOSYS, "pidfd_open is not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    result, out = run(executor, session, "echo fallback; exit 5")
    assert result.exit_code == 5
    assert out.text() == "fallback\n"


def test_a_full_sink_pauses_its_pipe_and_memory_stays_bounded(
        tmp_path: Path, loop: IoLoop) -> None:
    read_size = 4096
    ex = ProcessExecutor(tmp_path / "state", kill_grace_s=1.0, cgroups="off", loop=loop,
                         read_size=read_size)
    try:
        session = ex.open_session(SessionSpec("r1", tmp_path / "work", "alice"))
        gate = threading.Event()
        sent: list[int] = []

        def send(inbox: str, body: Any) -> None:  # noqa: ARG001
            gate.wait()  # the broker does not acknowledge: the streamer is stuck
            sent.append(len(getattr(body, "data", "")))

        max_pending = 10_000
        streamer = OutputStreamer("e", send, max_bytes=10**9, ring_bytes=0, chunk_bytes=1000,
                                  linger_s=0.0, max_pending=max_pending)
        streamer.add_target("inbox")
        streamer.start()
        size = 3_000_000
        big = ex.start(_spec(session, f"head -c {size} /dev/zero"), streamer)
        wait_for(lambda: streamer.pending_bytes >= max_pending, message="nothing buffered")
        # Paused, not blocked: the loop still serves another command meanwhile.
        result, out = run(ex, session, "echo other")
        assert result.exit_code == 0
        assert out.text() == "other\n"
        assert ex.wait(big, 0) is None  # the command is held by its full pipe
        assert streamer.pending_bytes <= max_pending + read_size
        gate.set()
        ended = ex.wait(big, 30)
        assert ended is not None
        assert ended.exit_code == 0
        streamer.close_input()
        assert streamer.wait_cut(30)
        assert streamer.output_bytes == size
    finally:
        gate.set()
        ex.close()


def test_fifty_commands_start_no_thread_after_the_first(
        executor: ProcessExecutor, session: SessionHandle,
        monkeypatch: pytest.MonkeyPatch) -> None:
    result, out = run(executor, session, "echo 0; echo e >&2")
    assert (result.exit_code, out.text(), out.text("stderr")) == (0, "0\n", "e\n")
    before = set(threading.enumerate())
    started = record_thread_starts(monkeypatch)
    for number in range(1, 50):
        result, out = run(executor, session, f"echo {number}; echo e >&2")
        assert (result.exit_code, out.text(), out.text("stderr")) == (0, f"{number}\n", "e\n")
    assert started == []
    assert set(threading.enumerate()) <= before


def test_the_loop_survives_a_sink_and_a_callback_that_raise(
        executor: ProcessExecutor, session: SessionHandle, loop: IoLoop) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("sink failed")

    handle = executor.start(_spec(session, "echo lost; exit 4"), broken)
    result = executor.wait(handle, 10)
    assert result is not None
    assert result.exit_code == 4
    ran = threading.Event()
    loop.call_soon(_raise)
    loop.call_later(0, _raise)
    loop.call_soon(ran.set)
    assert ran.wait(10)
    result, out = run(executor, session, "echo fine")
    assert result.exit_code == 0
    assert out.text() == "fine\n"


def test_timers_run_in_order_and_a_cancelled_one_never(loop: IoLoop) -> None:
    order: list[str] = []
    done = threading.Event()
    cancelled = loop.call_later(0.02, order.append, "cancelled")

    def late() -> None:
        order.append("late")
        done.set()

    loop.call_later(0.05, late)
    loop.call_later(0.01, order.append, "early")
    cancelled.cancel()
    assert done.wait(10)
    assert order == ["early", "late"]


def test_the_thread_ends_when_nothing_holds_it_and_the_next_use_restarts_it() -> None:
    made = IoLoop("test-io-idle")
    ran = threading.Event()
    made.call_soon(ran.set)
    assert ran.wait(10)
    wait_for(lambda: made.thread is None, message="an unheld, empty loop kept its thread")
    again = threading.Event()
    made.call_soon(again.set)
    assert again.wait(10)
    wait_for(lambda: made.thread is None, message="the restarted thread did not end")


def test_a_call_made_while_a_new_thread_waits_for_its_first_timer_runs_at_once() -> None:
    """A loop started by a far timer still wakes for what comes next (the new thread
    used to count as woken, so a call or an earlier timer waited for the far one)."""
    made = IoLoop("test-io-first")
    far = made.call_later(60.0, lambda: None)
    wait_for(lambda: _waiting(made), message="the loop thread waiting for its timer")
    ran, soon = threading.Event(), threading.Event()
    made.call_soon(ran.set)
    made.call_later(0.01, soon.set)
    try:
        assert ran.wait(10)
        assert soon.wait(10)
    finally:
        far.cancel()
    wait_for(lambda: made.thread is None, message="the loop thread did not end")


def _waiting(loop: IoLoop) -> bool:
    """Is the loop's thread inside its selector's wait?"""
    thread = loop.thread
    frame = sys._current_frames().get(thread.ident or 0) if thread is not None else None
    return frame is not None and frame.f_code.co_name == "select"


def _raise() -> None:
    raise RuntimeError("callback failed")


def _spec(session: SessionHandle, command: str) -> TaskSpec:
    return TaskSpec(task_id=f"t-{uuid.uuid4().hex[:10]}", command=command, session=session)

