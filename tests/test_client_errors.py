"""What a user sees when something is wrong: one exception root, words not protocol,
and no error that ends a shell session (issue 8, items 13 and 20).

Every error the client API raises is a ``ClientError``; the bus's and the codec's
(``BusError``, ``WireError``) used to escape, and the shell, which caught only
``ClientError``, ended on them and threw its reservation away. Each test runs on both
brokers (the ``grid`` harness; on Mosquitto through the exported ACL, which must let a
client read the coordinator's status).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.config import load_config
from client.console import Console
from client.errors import ClientError, CoordinatorDown, InvalidRequest, Unreachable
from client.reservation import Refused
from client.shell import Shell, run_line
from client.shell_syntax import reserve_args
from client.validation import max_command_length
from schemas.errors import XcloudError
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]


def test_bad_requests_raise_client_errors_that_say_what_was_wrong(grid: GridHarness) -> None:
    grid.start_coordinator()
    grid.start_worker("w1")
    alice = grid.client("alice", "client")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: alice.reserve(any={"min_cpus": -1}),
         "the minimum number of cpus must be 0 or more, not -1"),
        (lambda: alice.reserve("w1", lease_s=99999999), "out of range: choose 5 to 86400"),
        (lambda: alice.workers(state=["foo"]),
         "unknown state 'foo'; choose online, draining, lost or offline"),
        (lambda: alice.workers(min_memory_bytes=-5), "the minimum memory must be 0 or more"),
        (lambda: alice.reserve(any={"executor": "vm"}), "unknown executor 'vm'"),
        (lambda: alice.worker("x" * 500), "at most 128"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidRequest) as info:
            call()
        assert words in str(info.value)
        assert "outgoing" not in str(info.value)
        assert "data." not in str(info.value)
    with alice.reserve("w1") as w:
        too_long = "x" * (max_command_length() + 4464)
        with pytest.raises(InvalidRequest, match="characters long; at most"):
            w.run(too_long)
        with pytest.raises(InvalidRequest, match="empty command"):
            w.start("  ")
        assert not w.ended
        assert w.run("echo still-mine").text == "still-mine\n"


def test_no_coordinator_on_the_root_is_said_in_words(grid: GridHarness) -> None:
    """No coordinator ever ran here: no retained status, so the request times out."""
    alice = grid.client("alice", "client")
    alice.config.bus.request_timeout_s = 0.5
    with pytest.raises(Unreachable) as info:
        alice.workers()
    text = str(info.value)
    assert "no answer from the coordinator within 0.5s: is it running?" in text
    assert "workers.list" not in text


def test_a_stopped_coordinator_fails_requests_at_once(grid: GridHarness) -> None:
    """Its retained ``coord.status down`` answers instead of a long request timeout."""
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    alice.config.bus.request_timeout_s = 60.0  # what a timeout would have cost
    assert alice.workers() == []
    assert alice.coordinator is not None
    assert alice.coordinator.up
    grid.stop_coordinator()
    wait_for(lambda: alice.coordinator is not None and not alice.coordinator.up, 10,
             message="the coordinator's status says down")
    with pytest.raises(CoordinatorDown) as info:
        alice.workers()
    assert "the coordinator is not running (its status on the broker says down since" \
        in str(info.value)
    assert isinstance(info.value, ClientError)
    # A session that connects afterwards learns it from the retained status.
    late = grid.client("bob", "client")
    late.config.bus.request_timeout_s = 60.0
    with pytest.raises(CoordinatorDown):
        late.reserve()
    grid.start_coordinator()  # back: requests are served again
    wait_for(lambda: alice.coordinator is not None and alice.coordinator.up, 10,
             message="the coordinator's status says up")
    assert alice.workers() == []


def test_connection_failures_are_client_errors(tmp_path: Path) -> None:
    from client.api import Grid

    config = load_config(env={"XCLOUD_HOME": str(tmp_path), "XCLOUD_BUS_URL": "nonsense://x",
                               "XCLOUD_BUS_PRINCIPAL": "alice", "XCLOUD_BUS_TOKEN": "t"})
    with pytest.raises(ClientError, match="bad broker URL"):
        Grid(config)


def test_nothing_ends_a_shell_session(grid: GridHarness) -> None:
    """The inputs that used to end the shell (and release its worker, kill its
    background commands, delete its work directory) now print one line each."""
    grid.start_coordinator()
    grid.start_worker("w1")
    client = grid.client("carol", "client")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(client, Console(out, err, color=False))
    for line in ("reserveWorker any --min-cpus -1", "reserveWorker 0 --lease 99999999",
                 "nonsense", "help nonsense"):
        assert run_line(shell, line), line
    assert shell.reserved is None
    assert run_line(shell, "reserveWorker 0")
    assert shell.reserved is not None
    held = shell.reserved.id
    assert run_line(shell, "start sleep 600")
    assert run_line(shell, "output echo kept > marker")
    assert run_line(shell, "output " + "x" * 70_000)
    grid.stop_coordinator()
    wait_for(lambda: client.coordinator is not None and not client.coordinator.up, 10,
             message="the coordinator's status says down")
    assert run_line(shell, "listWorkers")
    errors = err.getvalue()
    assert "Traceback" not in errors
    assert "outgoing" not in errors
    assert "coordinator is not running" in errors
    assert "the command is 70,000 characters long" in errors
    assert "the minimum number of cpus must be 0 or more" in errors
    assert "a lease of 99999999.0 seconds is out of range" in errors
    # The reservation, its background command and its work directory are all still there.
    assert shell.reserved is not None
    assert shell.reserved.id == held
    assert not shell.reserved.ended
    assert [e.state for e in shell.reserved.ps() if e.command == "sleep 600"] == ["running"]
    assert shell.reserved.run("cat marker").text == "kept\n"
    grid.start_coordinator()


def test_an_unexpected_error_does_not_end_the_shell(grid: GridHarness) -> None:
    client = grid.client("dave", "client")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(client, Console(out, err, color=False))

    def broken(_rest: str) -> None:
        raise RuntimeError("a bug")

    shell.cmd_listworkers = broken  # type: ignore[method-assign]
    assert run_line(shell, "listWorkers")
    assert "internal error" in err.getvalue()
    assert not run_line(shell, "exit")


def test_refusals_keep_their_code_and_are_client_errors(grid: GridHarness) -> None:
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    with pytest.raises(Refused) as info:
        alice.reserve("no-such-worker")
    assert info.value.code == "not_found"
    assert isinstance(info.value, ClientError)
    assert "reserve refused" not in str(info.value)


def test_one_root_for_everything_the_client_raises() -> None:
    assert issubclass(ClientError, XcloudError)
    for cls in (InvalidRequest, Unreachable, CoordinatorDown, Refused):
        assert issubclass(cls, ClientError)
    assert reserve_args(["any", "--wait"])[2] == {"wait": float("inf")}
    assert reserve_args(["--wait", "30", "--tag", "x"]) == (None, {"tags": ["x"]},
                                                            {"wait": 30.0})
    assert reserve_args(["0", "--wait", "--lease", "60"]) == (0, {}, {"wait": float("inf"),
                                                                    "lease_s": 60.0})
