"""End to end: a real grid (`xcloud up`: broker, coordinator, 2 workers) and the real
shell in a real terminal (tmux), as a user would type xCloud's session:

    listWorkers / reserveWorker 0 / myWorker / output ls -al

plus Ctrl-C during ``output sleep 30``. :class:`E2EGrid` (also used by
tests/test_run_e2e.py) runs the grid as a subprocess in its own process group under a
private XCLOUD_HOME; nothing here waits by sleeping.

The most important tests run on both executors (``@BOTH_EXECUTORS``): a grid of process
workers and one of docker workers (`xcloud up --executor docker`, sessions in the busybox
image, chosen with ``XCLOUD_WORKER_DOCKER_IMAGE``), each started once per module. When a
grid stops, what its workers kept of reservations (session dirs, docker containers) is
removed, and must have been nothing: every reservation was released or ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from broker.config import Config, load_config
from tests.fixtures.services import BUSYBOX_IMAGE, free_port, wait_for

if TYPE_CHECKING:
    import docker

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Parametrizes a test over the ``grid`` fixture: process workers, docker workers.
BOTH_EXECUTORS = pytest.mark.parametrize(
    "grid", ["process", pytest.param("docker", marks=pytest.mark.docker)], indirect=True)


class E2EGrid:
    """``python -m client.cli up --port P --workers N --executor E`` with its own
    XCLOUD_HOME. Docker workers run their sessions in ``docker_image``; ``engine`` (a
    docker client) lets :meth:`stop` find and remove containers they left."""

    def __init__(self, home: Path, workers: int = 2, executor: str = "process",
                 docker_image: str = BUSYBOX_IMAGE,
                 engine: docker.DockerClient | None = None) -> None:
        self.home = home
        self.workers = workers
        self.executor = executor
        self.engine = engine
        self.port = free_port()
        self.log_path = home / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Reservations whose session a test knows to outlive the grid (see stop()).
        self.expected_leftovers: set[str] = set()
        env = {k: v for k, v in os.environ.items() if not k.startswith("XCLOUD_")}
        path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(XCLOUD_HOME=str(home), PYTHONPATH=path, PYTHONUNBUFFERED="1")
        if executor == "docker":  # `xcloud up` passes its environment to the workers
            env["XCLOUD_WORKER_DOCKER_IMAGE"] = docker_image
        if os.environ.get("XCLOUD_LOG_LEVEL"):
            env["XCLOUD_LOG_LEVEL"] = os.environ["XCLOUD_LOG_LEVEL"]
        self.env = env

    @property
    def docker(self) -> bool:
        return self.executor == "docker"

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> E2EGrid:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "up", "--port", str(self.port),
                 "--workers", str(self.workers), "--executor", self.executor],
                cwd=REPO, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.wait_online(self.workers, timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[str]:
        """SIGTERM the grid's process group (it stops its workers), then make sure.

        Returns what the workers kept of reservations ("<wid>/<rid>" for a session dir,
        "container <name>" for a docker container) and removes it: stopped workers keep
        the sessions of reservations they still had open, for their next run.
        """
        proc = self.proc
        if proc is None:
            return []
        self.proc = None
        try:
            family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(True)]
        except psutil.NoSuchProcess:
            family = [proc.pid]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        leftovers = []
        for pid in family[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftovers.append(psutil.Process(pid))
        for p in leftovers:  # workers run in their own sessions; and their commands
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftovers, timeout=10)
        return self.remove_sessions()

    def worker_ids(self) -> list[str]:
        return sorted(p.name for p in (self.home / "workers").glob("*") if p.is_dir())

    def sessions(self, wid: str = "*", rid: str = "*") -> dict[str, Path | str]:
        """The session dirs and docker containers of this grid's workers, by name:
        "<wid>/<rid>" -> dir, "container xcloud-<wid>-<rid>" -> container id."""
        found: dict[str, Path | str] = {}
        for session in sorted((self.home / "workers").glob(f"{wid}/sessions/{rid}")):
            found[f"{session.parent.parent.name}/{session.name}"] = session
        if self.engine is not None:
            labels = ["xcloud.executor=docker"] + ([f"xcloud.session={rid}"] if rid != "*"
                                                   else [])
            for w in (self.worker_ids() if wid == "*" else [wid]):
                for c in self.engine.api.containers(
                        all=True, filters={"label": [f"xcloud.worker={w}", *labels]}):
                    found[f"container {c['Names'][0].lstrip('/')}"] = str(c["Id"])
        return found

    def remove_sessions(self) -> list[str]:
        """Remove (and name) the session dirs and containers of this grid's workers."""
        found = self.sessions()
        for what in found.values():
            if isinstance(what, Path):
                shutil.rmtree(what, ignore_errors=True)
            elif self.engine is not None:
                self.engine.api.remove_container(what, force=True)
        return list(found)

    def worker_log(self, wid: str) -> str:
        try:
            return (self.home / "logs" / f"{wid}.log").read_text(errors="replace")
        except OSError:
            return ""

    def unexpected(self, kept: list[str]) -> list[str]:
        """What ``stop()`` returned minus the sessions of ``expected_leftovers``."""
        return [k for k in kept if not any(k.endswith(f"/{rid}") or k.endswith(f"-{rid}")
                                           for rid in self.expected_leftovers)]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    # -- the CLI ------------------------------------------------------------------------

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "client.cli", *args], cwd=REPO, env=env or self.env,
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"xcloud {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def workers_json(self) -> list[dict[str, Any]]:
        result = self.cli("workers", "--json")
        if result.returncode != 0:
            return []
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def online(self) -> list[str]:
        return [w["id"] for w in self.workers_json() if w["state"] == "online"]

    def wait_online(self, count: int, timeout: float = 60) -> list[str]:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"xcloud up exited {self.proc.returncode}:\n{self.log_text()}")
        return wait_for(lambda: (lambda ids: ids if len(ids) >= count else None)(self.online()),
                        timeout=timeout, interval=0.2,
                        message=f"{count} online workers\n{self.log_text()}")

    def add_principal(self, prefix: str = "user") -> tuple[str, str]:
        """A fresh client principal through `xcloud admin principal add`; (id, token)."""
        pid = f"{prefix}-{uuid.uuid4().hex[:6]}"
        result = self.cli("admin", "principal", "add", pid, check=True)
        token = result.stdout.strip().splitlines()[-1].strip()
        return pid, token

    def client_env(self, principal: str, token: str) -> dict[str, str]:
        return dict(self.env, XCLOUD_BUS_PRINCIPAL=principal, XCLOUD_BUS_TOKEN=token)

    def config(self, principal: str | None = None, token: str | None = None) -> Config:
        """The client configuration `xcloud up` wrote, optionally as another principal."""
        env = dict(self.env)
        if principal and token:
            env.update(XCLOUD_BUS_PRINCIPAL=principal, XCLOUD_BUS_TOKEN=token)
        return load_config(env=env)

    def worker_process(self, wid: str) -> psutil.Process:
        """The worker agent process of ``wid`` (a child of `xcloud up`)."""
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = child.cmdline()
                if "worker" in cmd and "--name" in cmd and cmd[cmd.index("--name") + 1] == wid:
                    return child
        raise AssertionError(f"no process for worker {wid}")


def run_grid(request: pytest.FixtureRequest, executor: str) -> Iterator[E2EGrid]:
    """A started E2EGrid of ``executor`` workers for a module-scoped fixture; at the end
    it is stopped and nothing may be left of its sessions."""
    engine = None
    if executor == "docker":
        request.getfixturevalue("docker_image")(BUSYBOX_IMAGE)
        engine = request.getfixturevalue("docker_engine")
    home = request.getfixturevalue("tmp_path_factory").mktemp(f"xcloud-home-{executor}")
    g = E2EGrid(home, executor=executor, engine=engine)
    g.start()
    try:
        yield g
    finally:
        kept = g.stop()
    unexpected = g.unexpected(kept)
    assert not unexpected, f"left behind after `xcloud up` stopped: {unexpected}"


@pytest.fixture(scope="module")
def process_grid(request: pytest.FixtureRequest) -> Iterator[E2EGrid]:
    yield from run_grid(request, "process")


@pytest.fixture(scope="module")
def docker_grid(request: pytest.FixtureRequest) -> Iterator[E2EGrid]:
    yield from run_grid(request, "docker")


@pytest.fixture
def grid(request: pytest.FixtureRequest) -> E2EGrid:
    """The process grid, or the docker one for tests parametrized with BOTH_EXECUTORS."""
    executor = getattr(request, "param", "process")
    value: E2EGrid = request.getfixturevalue(f"{executor}_grid")
    return value


# -- tmux -----------------------------------------------------------------------------------


class Tmux:
    """One tmux server on a private socket, running one command in a 200x50 pane."""

    def __init__(self, socket_path: Path, env: dict[str, str]) -> None:
        self.socket = socket_path
        self.env = env
        self.session = "xc"

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
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    principal, token = grid.add_principal("shell")
    env = grid.client_env(principal, token)
    env.pop("NO_COLOR", None)
    env["TERM"] = "xterm-256color"
    term = Tmux(tmp_path / "tmux.sock", env)
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
        assert " xcloud " in screen and ".xcloud" in screen
    term.type("output pwd; id -u")
    screen = term.wait_text("[exit 0", after="output pwd; id -u")
    lines = screen.splitlines()
    if grid.docker:
        assert "/work" in lines and "1000" in lines, screen
    else:  # the session's work dir on the host, as the worker's own user
        assert str(os.getuid()) in lines, screen
        assert any(line.startswith(str(grid.home)) and line.endswith("/work")
                   for line in lines), screen

    # Back at the prompt, the bottom toolbar shows connection, worker and lease.
    screen = term.wait_text("connected", f"worker {first}", "lease", after="[exit 0")
    assert "left" in screen


@BOTH_EXECUTORS
def test_ctrl_c_interrupts_the_remote_command(grid: E2EGrid, tmux_shell: Tmux) -> None:
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
    assert "online" in result.stdout and "one" in result.stdout
    assert "two" in result.stderr
    assert "\x1b[" not in result.stdout  # no colour without a terminal
