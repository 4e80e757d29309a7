"""Full-screen and interactive programs through ``xcloud attach`` (docs/exec.md "Terminal").

What a newcomer does on a worker's terminal: edits a file with vim (and vim sees the
window size, also after a resize), watches top, uses a Python prompt (Ctrl-C, Ctrl-D).
less is covered by tests/test_terminal.py (``test_full_screen_program``). The client runs
on a real pty held by the test, as in tests/test_terminal.py (whose ``Screen`` this
reuses), with TERM=xterm-256color; every test runs on both brokers, the process executor,
and the Python prompt also on the docker executor (xcloud-base, which has python3).

Keys go in the pieces a person types, each after the screen showed that the program is
ready for it (vim's mode, a prompt): never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.services import BASE_IMAGE, require_executable, wait_for
from tests.test_terminal import Screen
from worker.terminal import set_winsize

WID = "w1"
#: Generous: vim and top start a little slower on a loaded machine, docker more so.
APP_DEADLINE_S = 60.0
#: How often to ask vim its size after a resize before giving up (the resize and the
#: keys are separate messages: the first ask may come before the new size).
RESIZE_ASKS = 100
VIM_SIZE = b':echo "L=".&lines."x".&columns\r'


class AppScreen(Screen):
    """A ``Screen`` read like ``expect``: each ``expect`` looks only at what the screen
    showed after the previous match, so an old prompt or an old frame never answers."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pos = 0

    def expect(self, pattern: bytes, timeout: float = APP_DEADLINE_S) -> re.Match[bytes]:
        """The first match of ``pattern`` (a regex) past the previous one; AssertionError
        at the deadline, with what was shown since."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (match := regex.search(self.seen, self.pos)) is None:
            left = deadline - time.monotonic()
            assert left > 0, (f"no {pattern!r} on the screen; since the last match: "
                              f"{self.seen[self.pos:][-1500:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)
        self.pos = match.end()
        return match

    def shell_prompt(self) -> None:
        self.expect(rb"[$#] ")

    def run(self, line: bytes, done: bytes) -> re.Match[bytes]:
        """Type ``line`` at the shell prompt, then wait for ``done`` and the next prompt."""
        self.type(line + b"\r")
        match = self.expect(done)
        self.shell_prompt()
        return match


@pytest.fixture
def screens() -> Iterator[list[AppScreen]]:
    """The test's terminals, closed (their clients killed) at its end."""
    made: list[AppScreen] = []
    yield made
    for screen in made:
        screen.close()


def start_worker(grid: GridHarness, executor: str = "process") -> WorkerHandle:
    """The worker ``WID`` in this process, on ``executor`` (docker: the xcloud-base image,
    which has python3)."""
    if executor == "process":
        return grid.start_worker(WID)
    from worker.agent import WorkerAgent

    grid.token(WID, "worker")
    cfg = grid.config_for(WID, "worker")
    cfg.worker.executor = executor
    cfg.worker.docker_image = BASE_IMAGE
    handle = WorkerHandle(WID, grid.tmp_path / "workers" / WID)
    handle.agent = WorkerAgent(cfg, state_dir=handle.state_dir)
    grid.workers.append(handle)
    handle.agent.start(timeout=5)
    grid.wait_worker(WID, "online", timeout=15)
    return handle


def attach(screens: list[AppScreen], grid: GridHarness, tmp_path: Path, **kw: Any) -> AppScreen:
    """``xcloud attach WID`` on a new terminal (TERM=xterm-256color), at its prompt."""
    screen = AppScreen(grid, tmp_path, "attach", WID, **kw)
    screens.append(screen)
    screen.shell_prompt()
    return screen


def detach(screen: AppScreen) -> None:
    """``exit`` the remote shell: status 0, the local terminal as it was."""
    screen.type(b"exit\r")
    assert screen.exit_status() == 0
    assert screen.restored()
    assert b"Traceback" not in screen.seen


def vim_size(screen: AppScreen) -> tuple[int, int]:
    """vim's own idea of the window (its &lines and &columns), asked from normal mode."""
    screen.type(VIM_SIZE)
    match = screen.expect(rb"L=(\d+)x(\d+)")
    return int(match[1]), int(match[2])


def test_vim_edits_a_file_and_follows_the_window(grid: GridHarness, tmp_path: Path,
                                                 screens: list[AppScreen]) -> None:
    require_executable("vim")
    grid.start_coordinator()
    start_worker(grid)
    screen = attach(screens, grid, tmp_path, rows=30, cols=100)
    screen.type(b"vim notes.txt\r")
    screen.expect(rb"\x1b\[\?1049h")  # the alternate screen
    screen.expect(rb'"notes\.txt" \[New\]')
    assert vim_size(screen) == (30, 100)  # the size sent at start
    set_winsize(screen.master, 40, 120)  # the window changed: the client gets SIGWINCH
    for _ in range(RESIZE_ASKS):
        if vim_size(screen) == (40, 120):
            break
    else:
        raise AssertionError(f"vim never saw 40x120: {screen.seen[-1500:]!r}")
    screen.type(b"i")
    screen.expect(b"-- INSERT --")  # insert mode: what follows is text
    screen.type(b"hello from vim")
    screen.expect(rb"hello from vim[\s\S]*1,15")  # all of it, the cursor after it
    screen.type(b"\x1b")  # Esc alone: a ':' right behind it could read as Alt-:
    screen.expect(b"1,14")  # normal mode: the cursor back on the last letter
    screen.type(b":wq\r")
    screen.expect(rb'"notes\.txt" \[New\] 1L, 15B written')
    screen.expect(rb"\x1b\[\?1049l")  # back to the normal screen
    screen.shell_prompt()
    screen.run(b"cat notes.txt; stty size", rb"hello from vim\r\n40 120\r\n")
    workdir = screen.run(b"echo WD=$XCLOUD_WORKDIR", rb"WD=(/\S+)\r\n")[1].decode()
    assert Path(workdir, "notes.txt").read_text() == "hello from vim\n"
    assert Path(workdir).is_relative_to(grid.tmp_path / "workers" / WID), workdir
    detach(screen)


def test_top_draws_and_quits(grid: GridHarness, tmp_path: Path,
                             screens: list[AppScreen]) -> None:
    require_executable("top", "top (procps)")
    grid.start_coordinator()
    start_worker(grid)
    screen = attach(screens, grid, tmp_path)
    screen.type(b"top -d 0.5; echo TOP=$?\r")
    screen.expect(b"load average")
    screen.expect(b"Tasks:")
    screen.expect(b"load average")  # and again: it refreshes
    screen.type(b"q")
    screen.expect(b"TOP=0\r\n")
    screen.shell_prompt()
    detach(screen)


def in_select(tag: str) -> bool:
    """Whether the process with ``tag`` on its command line sleeps in select or poll
    (its /proc wchan; docker's processes are the host's too)."""
    for proc in psutil.process_iter(["cmdline"]):
        if tag in (proc.info["cmdline"] or []):
            with contextlib.suppress(OSError):
                wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
                return "poll" in wchan or "select" in wchan
    return False


def test_python_prompt(grid: GridHarness, executor_kind: str, tmp_path: Path,
                       screens: list[AppScreen]) -> None:
    grid.start_coordinator()
    start_worker(grid, executor_kind)
    screen = attach(screens, grid, tmp_path)
    tag = f"xcloud_test={uuid.uuid4().hex}"  # -X takes any name: ours finds the process
    screen.type(f"python3 -q -X {tag}; echo PY=$?\r".encode())
    screen.expect(b">>> ")
    screen.type(b"print(6*7)\r")
    screen.expect(b"\r\n42\r\n>>> ")
    # CPython's prompt draws ">>> " and only then waits in select(): a SIGINT in between
    # sets its flag without waking it, and the KeyboardInterrupt comes with the next
    # line instead (a bare pty shows it too, a few times in a hundred). A person is never
    # that quick; the test waits until Python waits.
    wait_for(lambda: in_select(tag), timeout=APP_DEADLINE_S,
             message="python3 never waited for input")
    screen.type(b"\x03")  # Ctrl-C at the prompt: KeyboardInterrupt, the prompt stays
    screen.expect(b"KeyboardInterrupt\r\n>>> ")
    screen.type(b"print(6*8)\r")
    screen.expect(b"\r\n48\r\n>>> ")
    screen.type(b"\x04")  # Ctrl-D at the prompt: Python ends, the shell goes on
    screen.expect(b"PY=0\r\n")
    screen.shell_prompt()
    detach(screen)
