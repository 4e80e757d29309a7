"""End to end: a real grid (`xcloud up`: broker, coordinator, 2 workers) and the real
shell in a real terminal (tmux), as a user would type xCloud's session:

    listWorkers / reserveWorker 0 / myWorker / output ls -al

plus Ctrl-C during ``output sleep 30``. :class:`E2EGrid` (tests/fixtures/e2e.py) runs
the grid; nothing here waits by sleeping.

The most important tests run on both executors (``@BOTH_EXECUTORS``): a grid of process
workers and one of docker workers (`xcloud up --executor docker`, sessions in the busybox
image, chosen with ``XCLOUD_WORKER_DOCKER_IMAGE``), each started once per module. When a
grid stops, what its workers kept of reservations (session dirs, docker containers) is
removed, and must have been nothing: every reservation was released or ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.e2e import BOTH_EXECUTORS, REPO, E2EGrid
from tests.fixtures.services import require_executable, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# -- tmux -----------------------------------------------------------------------------------


class Tmux:
    """One tmux server on a private socket, running one command in a 200x50 pane."""

    def __init__(self, socket_path: Path, env: dict[str, str]) -> None:
        self.socket = socket_path
        self.env = env
        self.session = "xc"
        self.principal = ""  # who the shell runs as

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], env=self.env,
                              capture_output=True, text=True, timeout=20)

    def start(self, command: str) -> None:
        result = self._tmux("new-session", "-d", "-s", self.session, "-x", "200", "-y", "50",
                            command)
        assert result.returncode == 0, result.stderr
        self._tmux("set-option", "-t", self.session, "history-limit", "5000")

    def send(self, *keys: str) -> None:
        result = self._tmux("send-keys", "-t", self.session, *keys)
        assert result.returncode == 0, result.stderr

    def type(self, line: str) -> None:
        self.send("-l", line)
        self.send("Enter")

    def capture(self) -> str:
        result = self._tmux("capture-pane", "-p", "-J", "-t", self.session, "-S", "-1000")
        return result.stdout

    def wait_text(self, *needles: str, after: str = "", timeout: float = 30) -> str:
        """Wait until every needle is on the screen, below the last line showing ``after``
        (the command just typed); returns that part of the screen."""
        def seen() -> str | None:
            text = self.capture()
            if after:
                pos = text.rfind(after)
                if pos < 0:
                    return None
                text = text[pos + len(after):]
            return text if all(n in text for n in needles) else None

        try:
            return wait_for(seen, timeout=timeout, interval=0.05,
                            message=f"{needles!r} on the screen")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- screen ---\n{self.capture()}") from None

    def alive(self) -> bool:
        return self._tmux("has-session", "-t", self.session).returncode == 0

    def kill(self) -> None:
        self._tmux("kill-server")


@pytest.fixture
def tmux_shell(grid: E2EGrid, tmp_path: Path) -> Iterator[Tmux]:
    require_executable("tmux")
    principal, token = grid.add_principal("shell")
    env = grid.client_env(principal, token)
    env.pop("NO_COLOR", None)
    env["TERM"] = "xterm-256color"
    term = Tmux(tmp_path / "tmux.sock", env)
    term.principal = principal
    term.start(f"exec {sys.executable} -m client.cli shell")
    try:
        term.wait_text("xcloud>", timeout=30)
        yield term
        term.type("exit")  # leaving releases the worker for the next test
        wait_for(lambda: not term.alive(), timeout=20, message="the shell exits")
    finally:
        term.kill()


@BOTH_EXECUTORS
def test_xcloud_session_in_a_terminal(grid: E2EGrid, tmux_shell: Tmux) -> None:
    """listWorkers / reserveWorker 0 / myWorker / output ls -al, typed into the shell."""
    term = tmux_shell
    workers = sorted(grid.workers_json(), key=lambda w: w["index"])
    first = workers[0]["id"]

    term.type("listWorkers")
    screen = term.wait_text("STATE", "online", *(w["id"] for w in workers), after="listWorkers")

    term.type("reserveWorker 0")
    term.wait_text(f"reserved {first}", f"xcloud ({first})>", after="reserveWorker 0")

    term.type("myWorker")
    term.wait_text("reservation ", first, "expires in", after="myWorker")

    term.type("output touch hello.txt")  # the work dir persists between commands
    term.wait_text("[exit 0", after="output touch hello.txt")
    term.type("output ls -al")
    screen = term.wait_text("total", "hello.txt", " ..", "[exit 0", after="output ls -al")
    if grid.docker:  # the container's /work, owned by its user (uid 1000, "xcloud")
        assert " xcloud " in screen
        assert ".xcloud" in screen
    term.type("output pwd; id -u")
    screen = term.wait_text("[exit 0", after="output pwd; id -u")
    lines = screen.splitlines()
    if grid.docker:
        assert "/work" in lines, screen
        assert "1000" in lines, screen
    else:  # the session's work dir on the host, as the worker's own user
        assert str(os.getuid()) in lines, screen
        assert any(line.startswith(str(grid.home)) and line.endswith("/work")
                   for line in lines), screen

    # Back at the prompt, the bottom toolbar shows connection, worker and lease.
    screen = term.wait_text("connected", f"worker {first}", "lease", after="[exit 0")
    assert "left" in screen


@BOTH_EXECUTORS
@pytest.mark.usefixtures("grid")
def test_ctrl_c_interrupts_the_remote_command(tmux_shell: Tmux) -> None:
    term = tmux_shell
    term.type("reserve any")
    term.wait_text("reserved ", after="reserve any")
    started = time.monotonic()
    command = "output echo go-$((6*7)); sleep 30; echo not-interrupted"
    term.type(command)
    term.wait_text("go-42", after=command)
    term.send("C-c")
    screen = term.wait_text("sent SIGINT", "[killed by SIGINT", after=command, timeout=20)
    assert time.monotonic() - started < 25
    assert "not-interrupted" not in screen
    # The shell is alive and the worker is usable again.
    term.type("output echo alive-$((1+1))")
    term.wait_text("alive-2", "[exit 0", after="output echo alive-$((1+1))")
    term.type("ps")
    screen = term.wait_text("exited", "sleep 30", after=")> ps\n")
    assert "running" not in screen.split("\nxcloud")[0]


def test_piped_script_has_no_prompt(grid: E2EGrid) -> None:
    principal, token = grid.add_principal("pipe")
    env = grid.client_env(principal, token)
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "shell"], cwd=REPO, env=env,
        input="workers\nreserve any\noutput echo one; echo two >&2; exit 3\n",
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "xcloud>" not in result.stdout
    assert "online" in result.stdout
    assert "one" in result.stdout
    assert "two" in result.stderr
    assert "\x1b[" not in result.stdout  # no colour without a terminal


# -- what a newcomer hit (issue 8, items 13, 18, 19) ------------------------------------------


@pytest.mark.usefixtures("grid")
def test_errors_do_not_end_the_session(tmux_shell: Tmux) -> None:
    """Bad input used to end the shell, releasing the worker, killing background
    commands and deleting the work directory."""
    term = tmux_shell
    for line, words in (("reserveWorker any --min-cpus -1", "must be 0 or more"),
                        ("reserveWorker 1 --lease 99999999", "out of range"),
                        ("frobnicate", "unknown command")):
        term.type(line)
        term.wait_text("error: ", words, "\nxcloud>", after=f"xcloud> {line}")
    term.type("reserve any")
    term.wait_text("reserved ", after="reserve any")
    term.type("start sleep 600")
    term.wait_text("started ", after="start sleep 600")
    term.type("output echo kept > marker")
    term.wait_text("[exit 0", after="output echo kept > marker")
    term.type("reserveWorker 0 --min-cpus -1")
    term.wait_text("error: ", after="reserveWorker 0 --min-cpus -1")
    term.type("output cat marker; echo still-here")
    term.wait_text("kept", "still-here", "[exit 0", after="output cat marker; echo still-here")
    term.type("ps")
    screen = term.wait_text("sleep 600", after=")> ps\n")
    assert "running" in screen
    assert term.alive()


@pytest.mark.usefixtures("grid")
def test_ctrl_c_during_heavy_output_gives_the_prompt_back(tmux_shell: Tmux) -> None:
    term = tmux_shell
    term.type("reserve any")
    term.wait_text("reserved ", after="reserve any")
    term.type("output yes")
    term.wait_text("y\ny\ny\ny\n", timeout=30)
    term.send("C-c")
    # What piled up was dropped, and said so (the line that says SIGINT was sent may
    # have scrolled away under the output that was printed before it).
    # The prompt is back in seconds (it took up to a minute when the piled-up output was
    # printed first); 15 s leaves room for a loaded CI machine.
    term.wait_text("of output not shown after ^C", "[killed by SIGINT", "xcloud (",
                   timeout=15)
    term.type("output echo alive-$((2+2))")
    term.wait_text("alive-4", "[exit 0", after="output echo alive-$((2+2))")


def test_log_lines_go_above_the_prompt(grid: E2EGrid, tmux_shell: Tmux) -> None:
    """A warning (here: the shell's principal is revoked, its connection cut) is printed
    on its own lines above the prompt, not through it."""
    term = tmux_shell
    term.type("help")
    term.wait_text("COMMAND", after="help")
    grid.cli("admin", "principal", "revoke", term.principal, check=True)
    screen = term.wait_text("WARNING", "disconnected", timeout=30)
    for line in screen.splitlines():
        assert not ("xcloud>" in line and "WARNING" in line), screen
    term.type("help exit")  # the prompt still works (and is where it belongs)
    screen = term.wait_text("leave", after="xcloud> help exit")
    for line in term.capture().splitlines():
        assert not ("xcloud>" in line and "WARNING" in line), term.capture()
