"""Remote terminals (``exec.start`` with ``tty``, ``exec.resize``; docs/exec.md "Terminal").

Two harnesses, as in tests/test_exec_stdin.py: the wire-level one of
tests/test_exec_service.py (every test on (amqtt, process), (amqtt, docker) and
(mosquitto, process)), and the full grid (tests/fixtures/grid.py) with ``xcloud attach``
/ ``xcloud run -t`` in a child process whose terminal is a real pty held by the test, as
a person's terminal would be: the test types into its master, reads what the screen
would show, resizes it (TIOCSWINSZ: the kernel sends the client SIGWINCH) and compares
its termios attributes before and after.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from client.console import Console
from client.shell import run_line
from client.shell_commands import Shell
from schemas.exec_messages import ExecResize
from schemas.messages import Error, ExecStarted, Ok
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.services import wait_for
from tests.test_exec_service import (  # noqa: F401 - fixtures and the parametrizing hook
    TOPICS,
    WID,
    Client,
    Grid,
    Run,
    backend,
    broker_url,
    docker_leak_check,
    docker_on_mosquitto,
    executor_kind,
    grid_factory,
    no_leaked_processes,
    pytest_generate_tests,
)
from tests.test_exec_stdin import stdin_of
from worker.terminal import set_winsize

DEADLINE_S = 30.0


@pytest.fixture
def exec_grid(grid_factory: Any) -> Grid:  # noqa: F811 - the imported fixture
    grid: Grid = grid_factory()
    return grid


def start_tty(grid: Grid, rid: str, command: str, rows: int = 33, cols: int = 101
              ) -> tuple[str, Run]:
    started = grid.start(rid, command, tty={"rows": rows, "cols": cols, "term": "xterm"})
    assert isinstance(started, ExecStarted), started
    return started.exec_id, grid.alice.run_of(started.exec_id)


def until(run: Run, text: bytes, timeout: float = DEADLINE_S) -> bytes:
    """The command's output once it holds ``text`` (AssertionError at the deadline)."""
    try:
        wait_for(lambda: text in run.data(), timeout=timeout, message=f"no {text!r}")
    except AssertionError as err:
        raise AssertionError(f"{err}; the output: {run.data()[-800:]!r}") from None
    return run.data()


def resize(grid: Grid, rid: str, exec_id: str, rows: int, cols: int,
           client: Client | None = None, grant: str | None = None) -> Any:
    client = client or grid.alice
    return client.request(ExecResize(grant=grant or grid.grant(rid), exec_id=exec_id,
                                     rows=rows, cols=cols))


# ----------------------------------------------------------------- wire level, both executors


@docker_on_mosquitto
def test_size_resize_and_keys_on_the_pty(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, run = start_tty(exec_grid, rid, "stty size; tty; echo T=$TERM; read x; "
                             "echo got=$x; stty size")
    keys = stdin_of(exec_grid, rid, exec_id)
    first = until(run, b"T=xterm")
    assert b"33 101" in first
    assert re.search(rb"/dev/pts/\d+", first), first
    assert isinstance(resize(exec_grid, rid, exec_id, 40, 120), Ok)
    keys.write(b"hello\r")
    wait_for(lambda: run.exit is not None, timeout=DEADLINE_S, message="no exit")
    out = run.data()
    assert b"got=hello" in out
    assert out.rstrip().endswith(b"40 120"), out
    assert run.exit is not None
    assert run.exit.exit_code == 0
    assert set(o.stream for o in run.outputs.values()) == {"stdout"}  # the pty merges


@docker_on_mosquitto
def test_login_shell_ctrl_c_and_exit_code(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, run = start_tty(exec_grid, rid, "")  # no command: the login shell
    keys = stdin_of(exec_grid, rid, exec_id)
    # Its prompt first: a shell setting up line editing may flush what came before.
    wait_for(lambda: re.search(rb"[$#] ", run.data()), timeout=DEADLINE_S,
             message="no prompt")
    # The job itself says it runs (so it holds the terminal's foreground: a ^C before
    # that would reach the shell mid-fork instead, a race of the shell's own).
    keys.write(b"sh -c 'echo S$((1+1)); exec sleep 60'; echo NOT$((0+1))\r")
    until(run, b"S2\r\n")
    keys.write(b"\x03")  # ^C: SIGINT to the foreground group, from the remote tty
    # The prompt again (the ^C flushed what was typed meanwhile, as on any terminal)
    wait_for(lambda: re.search(rb"S2\r\n[\s\S]*[$#] ", run.data()), timeout=DEADLINE_S,
             message="no prompt after ^C")
    keys.write(b"echo BACK$((2+3)); pwd\r")
    out = until(run, b"BACK5")
    assert b"NOT1" not in out
    assert exec_grid.seen_workdir(rid).encode() in until(run, exec_grid.seen_workdir(
        rid).encode() + b"\r\n")
    keys.write(b"exit 7\r")
    wait_for(lambda: run.exit is not None, timeout=DEADLINE_S, message="no exit")
    assert run.exit is not None
    assert run.exit.exit_code == 7


def test_resize_refusals(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    plain = exec_grid.start(rid, "sleep 30")
    assert isinstance(plain, ExecStarted)
    reply = resize(exec_grid, rid, plain.exec_id, 10, 10)
    assert isinstance(reply, Error), reply
    assert reply.code == "invalid"
    exec_id, run = start_tty(exec_grid, rid, "sleep 30")
    mallorys = exec_grid.grant(rid, client="mallory")
    reply = resize(exec_grid, rid, exec_id, 10, 10, client=exec_grid.mallory, grant=mallorys)
    assert isinstance(reply, Error), reply
    assert reply.code == "forbidden"
    exec_grid.close_reservation(rid)
    wait_for(lambda: run.exit is not None, timeout=DEADLINE_S, message="no exit")


def test_empty_command_needs_a_tty(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    reply = exec_grid.start(rid, "")
    assert isinstance(reply, Error), reply
    assert reply.code == "invalid"


# ----------------------------------------------------------------- a person's terminal

# The child makes the test's pty its controlling terminal (so the kernel's SIGWINCH
# reaches it), then becomes `python -m client.cli ...`.
_CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "os.execv(sys.argv[1], sys.argv[1:])")


class Screen:
    """A pty the test holds as a person's terminal, with ``xcloud ARGS`` running on it."""

    def __init__(self, grid: GridHarness, cwd: Path, *args: str, rows: int = 30,
                 cols: int = 100, env: dict[str, str] | None = None) -> None:
        self.master, self.slave = os.openpty()
        set_winsize(self.slave, rows, cols)
        self.attrs = termios.tcgetattr(self.slave)
        env = grid.subprocess_env(
            XCLOUD_HOME=str(cwd / "home"), XCLOUD_BUS_URL=grid.url, XCLOUD_BUS_ROOT=grid.root,
            XCLOUD_BUS_PRINCIPAL="alice", XCLOUD_BUS_TOKEN=grid.token("alice", "client"),
            XCLOUD_LOG_LEVEL="ERROR", PYTHONPATH=str(REPO), TERM="xterm-256color",
            **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CTTY, sys.executable, "-m", "client.cli", *args],
            cwd=cwd, env=env, stdin=self.slave, stdout=self.slave, stderr=self.slave,
            start_new_session=True)
        self.seen = b""

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def until(self, pattern: bytes, timeout: float = DEADLINE_S) -> bytes:
        """What the screen showed up to ``pattern`` (a regex); AssertionError at the
        deadline, with what was seen."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} on the screen: {self.seen[-800:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)
        return self.seen

    def prompt(self) -> None:
        """Wait for the remote shell's first prompt (typing before it may be flushed)."""
        self.until(rb"[$#] ")

    def mark(self, n: int) -> None:
        """Run `echo M$((n))` remotely and wait for its output (not its echo)."""
        self.type(f"echo M$(({n}+0))\r".encode())
        self.until(f"M{n}\r\n".encode())

    def exit_status(self, timeout: float = DEADLINE_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(AssertionError):
                self.until(b"(?!)", timeout=0.5)  # what it showed meanwhile
            raise AssertionError(f"the client did not exit: {self.seen[-800:]!r}") from None
        with contextlib.suppress(OSError):  # what it wrote last
            while select.select([self.master], [], [], 0)[0]:
                data = os.read(self.master, 65536)
                if not data:
                    break
                self.seen += data
        return code

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.attrs

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def screens() -> Any:
    made: list[Screen] = []
    yield made
    for screen in made:
        screen.close()


def open_screen(screens: list[Screen], grid: GridHarness, tmp_path: Path, *args: str,
                **kw: Any) -> Screen:
    screen = Screen(grid, tmp_path, *args, **kw)
    screens.append(screen)
    return screen


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_attach_size_resize_ctrl_c_and_exit(grid: GridHarness, tmp_path: Path,
                                            screens: list[Screen]) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    screen = open_screen(screens, grid, tmp_path, "attach", WID, rows=30, cols=100)
    screen.prompt()
    screen.mark(1)
    assert not screen.restored()  # raw mode while attached
    screen.type(b"stty size\r")
    screen.until(rb"30 100\r\n")
    set_winsize(screen.master, 45, 132)  # the window changed: the kernel says SIGWINCH
    for n in range(2, 200):  # the resize and the typing are separate messages
        screen.type(b"stty size\r")
        screen.mark(n)
        if b"45 132" in screen.seen:
            break
    assert b"45 132\r\n" in screen.seen
    # The job says it runs, so it holds the foreground (see the wire-level twin).
    screen.type(b"sh -c 'echo S$((1+1)); exec sleep 60'; echo NOT$((0+1))\r")
    screen.until(b"S2\r\n")
    screen.type(b"\x03")  # Ctrl-C goes remote: the sleep dies, the shell stays
    screen.until(rb"S2\r\n[\s\S]*[$#] ")  # its prompt again (^C flushes typed-ahead keys)
    screen.mark(500)
    assert b"NOT1" not in screen.seen
    screen.type(b"(exit 3)\r")
    screen.until(rb"\(exit 3\)\r\n[\s\S]*[$#] ")  # the prompt (a ^D typed ahead is lost)
    screen.type(b"\x04")  # Ctrl-D at the prompt ends the shell: its status comes back
    assert screen.exit_status() == 3
    assert screen.restored()


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_full_screen_program(grid: GridHarness, tmp_path: Path,
                             screens: list[Screen]) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    screen = open_screen(screens, grid, tmp_path, "attach", WID)
    screen.prompt()
    screen.type(b"seq 1000 | sed 's/^/row /' > f.txt; less f.txt\r")
    screen.until(rb"\x1b\[\?1049h")  # less switched to the alternate screen
    screen.until(b"row 29")  # and drew a screenful
    screen.type(b"G")  # to the end
    screen.until(b"row 1000")
    screen.type(b"q")
    screen.until(rb"\x1b\[\?1049l")  # back to the normal screen
    screen.mark(1)
    screen.type(b"exit\r")
    assert screen.exit_status() == 0
    assert screen.restored()


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_worker_killed_restores_the_terminal(grid: GridHarness, tmp_path: Path,
                                             screens: list[Screen]) -> None:
    grid.start_coordinator()
    worker = grid.start_worker(WID, in_subprocess=True)
    screen = open_screen(screens, grid, tmp_path, "attach", WID)
    screen.prompt()
    screen.mark(1)
    assert not screen.restored()
    worker.kill()
    screen.until(b"terminal closed: .*\n")
    assert screen.exit_status() == 255
    assert screen.restored()
    assert b"Traceback" not in screen.seen
    assert re.search(rb"terminal closed: reservation \S+ ended", screen.seen), screen.seen


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_broker_gone_restores_the_terminal(grid: GridHarness, grid_broker: Any,
                                           tmp_path: Path, screens: list[Screen]) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    screen = open_screen(screens, grid, tmp_path, "attach", WID,
                         env={"XCLOUD_CLIENT_STALL_S": "1", "XCLOUD_BUS_REQUEST_TIMEOUT_S": "2"})
    screen.prompt()
    screen.mark(1)
    assert not screen.restored()
    grid_broker.stop()
    screen.until(b"terminal closed: the broker has been unreachable for 1s")
    assert screen.exit_status() == 255
    assert screen.restored()
    assert b"Traceback" not in screen.seen
    grid_broker.start()  # for a quick teardown of the grid


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_attach_uses_and_keeps_a_held_reservation(grid: GridHarness, tmp_path: Path,
                                                  screens: list[Screen]) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    with grid.client("alice", "client").reserve(WID) as held:
        held.run("echo kept > mine.txt")
        screen = open_screen(screens, grid, tmp_path, "attach")  # the one alice holds
        screen.prompt()
        screen.type(b"cat mine.txt; exit 5\r")
        assert screen.exit_status() == 5
        assert b"kept\r\n" in screen.seen
        assert screen.restored()
        assert not held.ended
        assert held.run("cat mine.txt").text == "kept\n"  # still held, files still there


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_run_t_has_a_tty(grid: GridHarness, tmp_path: Path, screens: list[Screen]) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    screen = open_screen(screens, grid, tmp_path, "run", "-t", "-w", WID, "--",
                         "tty; exit 4")
    assert screen.exit_status() == 4
    assert re.search(rb"/dev/pts/\d+\r\n", screen.seen), screen.seen
    assert screen.restored()
    # without -t the same command has no terminal
    plain = open_screen(screens, grid, tmp_path, "run", "-w", WID, "--", "tty")
    assert plain.exit_status() != 0
    assert b"not a tty" in plain.seen


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_shell_term_keeps_the_shell_and_its_reservation(
        grid: GridHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(grid.client("alice", "client"), Console(out, err, False))
    assert run_line(shell, f"reserve {WID}")
    keys_r, keys_w = os.pipe()  # not a terminal: keys go as they come, their end as ^D
    os.write(keys_w, b"echo in-term$((1+1)); exit 6\n")
    os.close(keys_w)
    screen_r, screen_w = os.pipe()
    with os.fdopen(keys_r, "rb") as keys, os.fdopen(screen_w, "wb") as screen:
        monkeypatch.setattr(sys, "stdin", keys)
        monkeypatch.setattr(sys, "stdout", screen)
        assert run_line(shell, "term")
        # refused (a command too long for the wire): an error, the shell goes on
        assert run_line(shell, "term " + "x" * 70000)
    with os.fdopen(screen_r, "rb") as shown:
        assert b"in-term2" in shown.read()
    assert shell.last_status == 6
    assert "[terminal closed: exit 6]" in err.getvalue() + out.getvalue()
    assert "characters long" in err.getvalue(), err.getvalue()
    assert run_line(shell, "output echo still-here")
    assert "still-here" in out.getvalue()
    assert run_line(shell, "release")


# ----------------------------------------------------------------- the local side, alone


def test_raw_mode_is_undone_on_an_exception() -> None:
    from client.terminal import RawMode

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        inside: list[Any] = []

        def fail_while_raw() -> None:
            with RawMode(slave):
                inside.append(termios.tcgetattr(slave))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            fail_while_raw()
        assert inside[0] != before  # raw inside
        assert termios.tcgetattr(slave) == before
        read_fd, write_fd = os.pipe()  # not a terminal: nothing to do, nothing fails
        with RawMode(read_fd) as raw:
            assert raw.saved is None
        os.close(read_fd)
        os.close(write_fd)
    finally:
        os.close(master)
        os.close(slave)


def test_window_size_and_term(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.terminal import local_term, window_size

    master, slave = os.openpty()
    try:
        set_winsize(slave, 51, 163)
        read_fd, write_fd = os.pipe()
        assert window_size(read_fd, slave) == (51, 163)  # the first that is a terminal
        monkeypatch.setenv("LINES", "12")
        monkeypatch.setenv("COLUMNS", "34")
        assert window_size(read_fd) == (12, 34)
        monkeypatch.delenv("LINES")
        monkeypatch.delenv("COLUMNS")
        assert window_size(read_fd) == (24, 80)
        os.close(read_fd)
        os.close(write_fd)
    finally:
        os.close(master)
        os.close(slave)
    monkeypatch.setenv("TERM", "screen-256color")
    assert local_term() == "screen-256color"
    for bad in ("dumb", "x" * 65, "vt100; rm -rf /", ""):
        monkeypatch.setenv("TERM", bad)
        assert local_term() == "xterm-256color"
