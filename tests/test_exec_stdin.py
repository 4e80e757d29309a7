"""Stdin of remote commands (``exec.stdin``, docs/exec.md "Input").

Two harnesses: the wire-level one of tests/test_exec_service.py (a coordinator principal,
the worker's ExecService, clients ``alice`` and ``mallory``; every test on (amqtt,
process), (amqtt, docker) and (mosquitto, process)), driven through the client's own
``StdinSender``; and the full grid (tests/fixtures/grid.py: coordinator, worker agent,
``client.api``) for the API and ``xcloud run`` in a child process.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from client.console import Console
from client.exec_stream import StdinSender
from client.shell import run_line
from client.shell_commands import Shell
from client.shell_syntax import split_local_input
from schemas.exec_messages import STDIN_WINDOW, ExecStdin, ExecStdinAck
from schemas.messages import Error, ExecStarted
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

MB = 1_000_000


@pytest.fixture
def exec_grid(grid_factory: Any) -> Grid:  # noqa: F811 - the imported fixture
    """The wire-level harness (named apart from tests/fixtures/grid.py's ``grid``)."""
    grid: Grid = grid_factory()
    return grid


def stdin_of(grid: Grid, rid: str, exec_id: str, client: Client | None = None,
             grant: str | None = None) -> StdinSender:
    """The client library's sender, on a harness client's bus."""
    client = client or grid.alice
    grant = grant or grid.grant(rid)

    def send(seq: int, data: bytes, eof: bool) -> Future[Any]:
        return client.bus.request_async(TOPICS.worker_inbox(WID), ExecStdin(
            grant=grant, exec_id=exec_id, seq=seq, data=base64.b64encode(data).decode(),
            eof=eof or None))

    def read_ack(reply: Any) -> tuple[int, bool]:
        assert isinstance(reply.body, ExecStdinAck), reply.body
        return reply.body.acked, reply.body.closed

    return StdinSender(exec_id, send, read_ack)


def test_pump_ends_quietly_when_the_bus_stops_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`xcloud run` closes its bus once the command has ended; the end of input still
    awaiting its answer then fails with the bus's error. The pump must log that, not
    print a traceback on the user's terminal (a README tour run once showed one)."""
    from broker.bus_types import BusError
    from client.exec_stream import feed_in_background

    uncaught: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args.exc_value))
    pending: list[Future[Any]] = []

    def send(_seq: int, _data: bytes, eof: bool) -> Future[Any]:
        assert eof  # nothing but the end of input
        fut: Future[Any] = Future()
        pending.append(fut)
        return fut

    sender = StdinSender("e1", send, lambda _reply: (0, False))
    read_end, write_end = os.pipe()
    os.close(write_end)  # stdin at its end at once, as from /dev/null
    try:
        pump = feed_in_background(sender, read_end, "stdin-pump")
        wait_for(lambda: bool(pending), timeout=5)
        pending[0].set_exception(BusError("bus stopped"))  # what Bus.stop does to it
        pump.join(timeout=5)
    finally:
        os.close(read_end)
    assert not pump.is_alive()
    assert uncaught == []


def start_reading(grid: Grid, rid: str, command: str) -> tuple[str, Run]:
    started = grid.start(rid, command, stdin=True)
    assert isinstance(started, ExecStarted), started
    return started.exec_id, grid.alice.run_of(started.exec_id)


def raw_stdin(grid: Grid, rid: str, exec_id: str, seq: int, data: bytes,
              eof: bool = False, client: Client | None = None,
              grant: str | None = None) -> Future[Any]:
    client = client or grid.alice
    return client.bus.request_async(TOPICS.worker_inbox(WID), ExecStdin(
        grant=grant or grid.grant(rid), exec_id=exec_id, seq=seq,
        data=base64.b64encode(data).decode(), eof=eof or None))


# ----------------------------------------------------------------- wire level, both executors


@docker_on_mosquitto
def test_cat_stream_arrives_byte_exact(exec_grid: Grid) -> None:
    """100 MB through ``cat`` and back on every executor and broker, checked by SHA-256
    (~8 s each on a 2-CPU machine: 12-15 MB/s on process and docker alike)."""
    rid = exec_grid.open()
    exec_id, run = start_reading(exec_grid, rid, "cat")
    data = random.Random(7).randbytes(100 * MB)
    sender = stdin_of(exec_grid, rid, exec_id)
    t0 = time.monotonic()
    sender.write(data)
    sender.close()
    wait_for(run.complete, timeout=120, message="cat did not finish")
    took = time.monotonic() - t0
    assert run.exit is not None
    assert run.exit.exit_code == 0
    assert hashlib.sha256(run.data()).hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"stdin through cat ({exec_grid.executor_kind}): {len(data) / took / MB:.1f} MB/s")


@docker_on_mosquitto
def test_eof_is_delivered(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, run = start_reading(exec_grid, rid, "wc -c")
    sender = stdin_of(exec_grid, rid, exec_id)
    sender.write(b"x" * 100_001)
    sender.close()
    wait_for(run.complete, timeout=30, message="wc did not see EOF")
    assert run.data().strip() == b"100001"


@docker_on_mosquitto
def test_head_on_endless_input_ends_cleanly(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, run = start_reading(exec_grid, rid, "head -c 10")
    sender = stdin_of(exec_grid, rid, exec_id)
    block = b"y" * 65536
    t0 = time.monotonic()
    sent = 0
    while not sender.closed:  # endless, until the worker says nobody reads
        sender.write(block)
        sent += len(block)
        assert time.monotonic() - t0 < 30, "the worker never said the input was closed"
    wait_for(run.complete, timeout=15, message="head did not finish")
    assert run.data() == b"y" * 10
    assert run.exit is not None
    assert run.exit.exit_code == 0
    assert time.monotonic() - t0 < 15
    assert sent < 64 * MB  # the window held the sender back


@docker_on_mosquitto
def test_resent_and_early_pieces(exec_grid: Grid) -> None:
    """A resent seq is taken once; a piece ahead of a gap waits for it."""
    rid = exec_grid.open()
    exec_id, run = start_reading(exec_grid, rid, "cat")
    first = raw_stdin(exec_grid, rid, exec_id, 0, b"ab")
    assert first.result(10).body.acked == 0
    again = raw_stdin(exec_grid, rid, exec_id, 0, b"ab")  # QoS 1 may deliver twice
    assert again.result(10).body.acked == 0
    late = raw_stdin(exec_grid, rid, exec_id, 2, b"ef", eof=True)
    gap = raw_stdin(exec_grid, rid, exec_id, 1, b"cd")
    assert gap.result(10).body.acked >= 1
    ack = late.result(10).body
    assert (ack.acked, ack.closed) == (2, True)
    wait_for(run.complete, timeout=15, message="cat did not finish")
    assert run.data() == b"abcdef"
    beyond = raw_stdin(exec_grid, rid, exec_id, 3, b"zz").result(10).body
    assert isinstance(beyond, ExecStdinAck)
    assert beyond.closed


def fed_through(exec_grid: Grid, rid: str, exec_id: str, run: Any, data: bytes) -> bytes:
    """Send ``data`` then EOF to a running ``cat``; what it wrote once it finished."""
    sender = stdin_of(exec_grid, rid, exec_id)
    sender.write(data)
    sender.close()
    wait_for(run.complete, timeout=15, message="cat did not finish")
    return bytes(run.data())


def test_input_survives_the_limits_gate(exec_grid: Grid) -> None:
    """With limits the process driver's shell first reads its gate line from the same
    pipe: the input after it must reach the command whole."""
    rid = exec_grid.open(limits={"memory_bytes": 1 << 30, "pids": 4096})
    exec_id, run = start_reading(exec_grid, rid, "cat")
    assert fed_through(exec_grid, rid, exec_id, run, b"first line\nsecond\n") == (
        b"first line\nsecond\n")


def test_window_is_enforced(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, _ = start_reading(exec_grid, rid, "sleep 30")
    # nothing acknowledged yet: seq 0 .. STDIN_WINDOW - 1 may be in flight, no further
    reply = raw_stdin(exec_grid, rid, exec_id, STDIN_WINDOW, b"x").result(10).body
    assert isinstance(reply, Error)
    assert reply.code == "conflict"


def test_someone_elses_stdin_changes_nothing(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    exec_id, run = start_reading(exec_grid, rid, "cat")
    # mallory with alice's grant, and with a grant of her own for alice's reservation
    for grant in (exec_grid.grant(rid), exec_grid.grant(rid, client="mallory")):
        reply = raw_stdin(exec_grid, rid, exec_id, 0, b"evil", eof=True,
                          client=exec_grid.mallory, grant=grant).result(10).body
        assert isinstance(reply, Error)
        assert reply.code == "forbidden"
    assert fed_through(exec_grid, rid, exec_id, run, b"mine") == b"mine"


def test_stdin_needs_a_command_started_with_it(exec_grid: Grid) -> None:
    rid = exec_grid.open()
    run = exec_grid.run(rid, "wc -c")  # no stdin: EOF at once, as before
    assert run.data().strip() == b"0"
    started = exec_grid.start(rid, "sleep 30")
    reply = raw_stdin(exec_grid, rid, started.exec_id, 0, b"x").result(10).body
    assert isinstance(reply, Error)
    assert reply.code == "invalid"


# --------------------------------------------------------------------- the API and the CLI


def xcloud(grid: GridHarness, principal: str, *args: str, cwd: Path, stdin: bytes
           ) -> subprocess.CompletedProcess[bytes]:
    env = grid.subprocess_env(XCLOUD_HOME=str(cwd / "home"), XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root, XCLOUD_BUS_PRINCIPAL=principal,
                              XCLOUD_BUS_TOKEN=grid.token(principal, "client"),
                              XCLOUD_LOG_LEVEL="ERROR", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, timeout=60, check=False)


def test_api_run_input_and_100mb_stream(grid: GridHarness) -> None:
    # A worker pumping 100 MB through cat on a loaded two-core CI machine can be late
    # with a heartbeat by more than the test grid's 0.6 s: this test is about the stream.
    grid.start_coordinator(liveness_factor=20)
    grid.start_worker(WID)
    c = grid.client("alice", "client")
    with c.reserve(WID) as w:
        assert w.run("cat", input="hi\n").stdout == b"hi\n"
        assert w.run("wc -c", input=b"x" * 12345).text.strip() == "12345"
        assert w.run("cat").stdout == b""  # no input: EOF
        data = random.Random(3).randbytes(100 * MB)
        stream = w.stream("cat", stdin=True, timeout=600)
        assert stream.stdin is not None
        stdin = stream.stdin

        def feed() -> None:
            for start in range(0, len(data), 4 * MB):
                stdin.write(data[start:start + 4 * MB])
            stdin.close()

        t0 = time.monotonic()
        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        digest = hashlib.sha256()
        size = 0
        for chunk in stream:
            digest.update(chunk.data)
            size += len(chunk.data)
        took = time.monotonic() - t0
        writer.join(10)
        assert stream.result.exit_code == 0
        assert size == len(data)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        print(f"100 MB through cat via the API: {len(data) / took / MB:.1f} MB/s")


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_cli_run_forwards_piped_stdin(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    done = xcloud(grid, "alice", "run", "-w", WID, "--", "cat", cwd=tmp_path, stdin=b"hi\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hi\n"
    head = xcloud(grid, "alice", "run", "-w", WID, "--", "head -c 3", cwd=tmp_path,
                  stdin=b"z" * (2 * MB))
    assert head.returncode == 0, head.stderr
    assert head.stdout == b"zzz"


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_shell_output_reads_a_local_file(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    grid.start_worker(WID)
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(grid.client("alice", "client"), Console(out, err, False))
    local = tmp_path / "local input.txt"
    local.write_bytes(b"one\ntwo\nthree\n" * 1000)
    assert run_line(shell, f"reserve {WID}")
    assert run_line(shell, f"output wc -l < '{local}'")
    assert "3000" in out.getvalue(), err.getvalue()
    # a file only the worker has is still the remote shell's redirection
    assert run_line(shell, "output echo remote > r.txt")
    assert run_line(shell, "output tr a-z A-Z < r.txt")
    assert "REMOTE" in out.getvalue(), err.getvalue()
    assert "internal error" not in err.getvalue()
    assert run_line(shell, "release")


@pytest.mark.parametrize(("line", "expected"), [
    ("wc -c < in.dat", ("wc -c", "in.dat")),
    ("tr a b <in", ("tr a b", "in")),
    ("cat < 'my file'", ("cat", "my file")),
    ('echo "a < b"', ('echo "a < b"', None)),
    ("cat << EOF", ("cat << EOF", None)),
    ("cat 2< x", ("cat 2< x", None)),
    ("sort <(ls)", ("sort <(ls)", None)),
    ("cat < a b", ("cat < a b", None)),
])
def test_split_local_input(line: str, expected: tuple[str, str | None]) -> None:
    assert split_local_input(line) == expected
