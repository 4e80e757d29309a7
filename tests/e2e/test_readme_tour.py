"""The README's five-minute tour, followed literally (issue 8, item 8).

The commands are read from README.md itself, in order, and run against a real grid
(`xcloud up`, tests/fixtures/e2e.py): each ``$ xcloud …`` line of a ``sh`` block as a
command, the ``$ xcloud shell`` session typed into a real terminal (tmux), the Python
block as a script. Only what differs from one machine to another is substituted: the
broker port (the README says 1884), the first worker's id (``vm-w1``) and the token a
``principal add`` printed (``<TOKEN>``). ``bash scripts/up`` is the fixture's own
`xcloud up`. Every step must succeed without an error line or a traceback, so a README
change that breaks the tour breaks this test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_shell_e2e import Tmux
from tests.fixtures.e2e import REPO, E2EGrid
from tests.fixtures.services import require_executable, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = REPO / "README.md"
PROMPT = re.compile(r"^xcloud(?: \([^)]*\))?> (.*)$")


@dataclass
class Block:
    lang: str
    lines: list[str]


def section(title: str) -> list[Block]:
    """The fenced blocks of the README's ``## title`` section, in order."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 5)
    return [Block(lang, body.splitlines())
            for lang, body in re.findall(r"```(\w*)\n(.*?)```",
                                         text[start:end if end > 0 else None], re.S)]


def tour() -> list[Block]:
    """The fenced blocks of the README's tour section, in order."""
    return section("A five-minute tour")


def commands(block: Block) -> list[str]:
    """The ``$ …`` lines of a block, continuation lines joined."""
    found: list[str] = []
    pending = ""
    for line in block.lines:
        if pending:
            pending += " " + line.strip()
        elif line.startswith("$ "):
            pending = line[2:].strip()
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        found.append(pending)
        pending = ""
    return found


@dataclass
class Tourist:
    """Follows the tour: runs its commands with the grid's client configuration."""

    grid: E2EGrid
    first_worker: str
    token: str = ""
    cwd: Path = REPO  # where the reader types the commands
    daemons: list[tuple[subprocess.Popen[str], list[str]]] = field(default_factory=list)

    def substitute(self, word: str) -> str:
        word = word.replace("127.0.0.1:1884", f"127.0.0.1:{self.grid.port}")
        word = word.replace("<TOKEN>", self.token)
        return self.first_worker if word == "vm-w1" else word

    def run(self, line: str) -> subprocess.CompletedProcess[str] | None:
        """Run one command line; the result of an ``xcloud`` command that ran to its end."""
        args = [self.substitute(w) for w in shlex.split(line, comments=True)]
        if "|" in args and args[0] != "xcloud":
            self.pipe(line, args)
            return None
        assert args[0] in ("xcloud", "bash"), line
        if args[0] == "bash":
            assert args[1] == "scripts/up", line  # the fixture's `xcloud up`
            shown = self.grid.log_text()
            assert "xcloud is up" in shown
            assert f"broker       mqtt://127.0.0.1:{self.grid.port}" in shown
            return None
        if args[1] == "worker":  # a daemon: runs until the end of its block
            self.start_worker(args[1:])
            return None
        result = self.grid.cli(*args[1:], timeout=120, cwd=self.cwd)
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"$ {line}\n{out}"
        assert "Traceback" not in out, f"$ {line}\n{out}"
        assert "error" not in result.stderr.lower(), f"$ {line}\n{out}"
        if args[1:4] == ["admin", "principal", "add"]:
            self.token = result.stdout.strip().splitlines()[-1]
        return result

    def pipe(self, line: str, args: list[str]) -> None:
        """``LOCAL COMMAND | xcloud ...``: the local command's output is xcloud's stdin."""
        bar = args.index("|")
        local, remote = args[:bar], args[bar + 1:]
        assert remote[0] == "xcloud", line
        fed = subprocess.run(local, cwd=self.cwd, capture_output=True, check=True, timeout=60)
        result = subprocess.run([sys.executable, "-m", "client.cli", *remote[1:]], cwd=self.cwd,
                                env=self.grid.env, input=fed.stdout, capture_output=True,
                                timeout=120)
        out = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, f"$ {line}\n{out}"
        assert "Traceback" not in out, f"$ {line}\n{out}"
        assert result.stdout.strip(), f"$ {line}: no output\n{out}"

    def spawn(self, args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
        """``xcloud ARGS`` left running, its output lines collected as they come."""
        proc = subprocess.Popen([sys.executable, "-m", "client.cli", *args], cwd=cwd,
                                env=self.grid.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        seen: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            seen.extend(iter(proc.stdout.readline, ""))

        threading.Thread(target=read, daemon=True).start()
        return proc, seen

    def start_worker(self, args: list[str]) -> None:
        proc, seen = self.spawn(args, REPO)
        self.daemons.append((proc, seen))
        wid = args[args.index("--id") + 1]
        wait_for(lambda: any(f"worker {wid} online at" in line for line in seen)
                 or proc.poll() is not None, 30, message=f"`xcloud worker` {wid} online")
        assert proc.poll() is None, "".join(seen)

    def stop_daemons(self) -> None:
        while self.daemons:
            proc, seen = self.daemons.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            assert "Traceback" not in "".join(seen), "".join(seen)

    def shell_session(self, block: Block, tmp_path: Path) -> None:
        """``$ xcloud shell`` and the lines typed at its prompt, in tmux."""
        require_executable("tmux")
        env = dict(self.grid.env, TERM="xterm-256color")
        term = Tmux(tmp_path / "tour.sock", env)
        term.start(f"exec {sys.executable} -m client.cli shell")
        try:
            term.wait_text("xcloud>", timeout=30)
            for pos, line in enumerate(block.lines[1:], start=1):
                typed = PROMPT.match(line)
                if typed is None:  # a line of expected output
                    expected = " ".join(self.substitute(w) for w in line.split()[:2])
                    term.wait_text(expected)
                    continue
                command = typed.group(1)
                term.type(command)
                if "Ctrl-C" in command.partition("#")[2]:
                    remote = shlex.split(command, comments=True)[1:]
                    wait_for(lambda remote=remote: _running(remote, self.grid.home.resolve()), 30,  # type: ignore[misc]
                             message=f"{remote} running on the worker")
                    term.send("C-c")
                screen = term.wait_text("\nxcloud", after=f"> {command}", timeout=60)
                done = screen[:screen.index("\nxcloud")]
                assert "error" not in done.lower(), f"line {pos}: {command}\n{screen}"
                assert "Traceback" not in done, screen
            term.type("exit")
            wait_for(lambda: not term.alive(), 20, message="the shell exits")
        finally:
            term.kill()


def _running(argv: list[str], under: Path) -> bool:
    """Is a process with this command line running in a work dir of this grid (process
    workers)? Other tests run the same commands (`sleep 60`) beside this one."""
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["cmdline"] or [])[-len(argv):] == argv and \
                    os.path.basename(proc.info["cmdline"][0]) == argv[0] and \
                    str(proc.info["cwd"] or "").startswith(str(under)):
                return True
    return False


@pytest.fixture
def tourist(process_grid: E2EGrid) -> Iterator[Tourist]:
    workers = sorted(process_grid.workers_json(), key=lambda w: w["index"])
    guide = Tourist(process_grid, workers[0]["id"])
    try:
        yield guide
    finally:
        guide.stop_daemons()


def test_the_readme_tour_followed_literally(tourist: Tourist, tmp_path: Path) -> None:
    blocks = tour()
    assert [b.lang for b in blocks].count("python") == 1
    ran = 0
    for block in blocks:
        if block.lang == "python":
            code = "\n".join(block.lines)
            result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                                    env=tourist.grid.env, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, result.stderr
            assert "0 b'42\\n'" in result.stdout, result.stdout
        elif block.lines and block.lines[0] == "$ xcloud shell":
            tourist.shell_session(block, tmp_path)
        else:
            for line in commands(block):
                tourist.run(line)
                ran += 1
            tourist.stop_daemons()
            if any(" worker " in f" {c} " for c in commands(block)):
                wait_for(lambda: "online" not in [w["state"] for w in
                                                  tourist.grid.workers_json()
                                                  if w["id"] == "lab-pc"],
                         30, message="lab-pc left the grid")
        ran += 1
    assert ran >= 20
    listed = [w["id"] for w in tourist.grid.workers_json()]
    assert "lab-pc" not in listed  # the tour forgot it at the end
