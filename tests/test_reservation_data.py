"""A stored data object placed on a reserved worker (``workdir.fetch``; docs/data.md, "On a
reserved worker"; worker/workdir_fetch.py, ``Store.worker_may_read``).

A real coordinator with its data store and a real worker (the process executor on both
brokers, the docker executor too); clients are ``client.api.Grid``s. Checked: the holder
places its own object (the command in the reservation reads the right bytes, docker
through the bind mount), a second placement is a hit of the worker's input cache (no
second fetch), another principal's private object is refused until shared (and nothing
is placed), requests without a valid grant are refused, path escapes are refused before
anything is fetched, and with the coordinator down nothing is placed, not even an object
the worker's cache holds (no rights check, no placement), while the reservation lives on.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.bus import RemoteError
from client.api import Grid
from client.console import Console
from client.data import DataRef
from client.file_copy import data_timeout, run_cp
from client.reservation import Refused, ReservedWorker
from client.shell_commands import Shell
from schemas.transfer_messages import WorkdirFetch
from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.transfer import make_file
from worker import workdir_fetch
from worker.input_cache import InputCache

pytestmark = [pytest.mark.integration]

MIB = 1 << 20
WID = "w1"


def start_worker(grid: GridHarness, executor: str, wid: str = WID) -> WorkerHandle:
    return grid.start_worker(wid, executor=executor)


def cache_of(worker: WorkerHandle) -> InputCache:
    assert worker.agent is not None
    cache = worker.agent.cache
    assert cache is not None
    return cache


def listing(w: ReservedWorker) -> list[str]:
    """The work directory's visible entries, as the command in the reservation sees them."""
    return [n for n in w.run("ls -A").text.split() if not n.startswith(".xcloud")]


@pytest.fixture
def alice(grid: GridHarness) -> Iterator[tuple[Grid, ReservedWorker, WorkerHandle]]:
    grid.start_coordinator()
    worker = start_worker(grid, "process")
    c = grid.client("alice", "client")
    handle = c.reserve(WID)
    yield c, handle, worker
    handle.release()


def test_the_holder_places_its_data_and_the_second_time_is_a_cache_hit(
        grid: GridHarness, tmp_path: Path, executor_kind: str) -> None:
    grid.start_coordinator()
    worker = start_worker(grid, executor_kind)
    c = grid.client("alice", "client")
    src = make_file(tmp_path / "input.bin", 3 * MIB + 11, seed=7)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    ref = c.data.put(src, name="run-1/input.bin")
    cache = cache_of(worker)
    with c.reserve(WID) as w:
        placed = w.put_data("run-1/input.bin")  # by name; default: its own name
        assert (placed.sha256, placed.size, placed.remote, placed.cached) == (
            digest, ref.size, "input.bin", False)
        seen = w.run("sha256sum input.bin")
        assert seen.returncode == 0, seen.text
        assert seen.text.split()[0] == digest
        assert cache.fetches == 1
        # Again, by hash, into a directory the command made: the worker holds it already.
        assert w.run("mkdir -p sub/dir").returncode == 0
        again = w.put_data(digest, "sub/dir")
        assert (again.remote, again.cached) == ("sub/dir/input.bin", True)
        assert w.run("sha256sum sub/dir/input.bin").text.split()[0] == digest
        assert cache.fetches == 1  # no second transfer from the coordinator
        # The placed copy is the command's: changing it does not touch the cache.
        assert w.run("echo changed > input.bin").returncode == 0
        assert hashlib.sha256(cache.path(digest).read_bytes()).hexdigest() == digest
        if executor_kind == "docker":  # the container sees it at /work as well
            assert w.run("sha256sum /work/sub/dir/input.bin").text.split()[0] == digest


def test_another_principals_private_data_is_refused_until_shared(
        grid: GridHarness, alice: tuple[Grid, ReservedWorker, WorkerHandle],
        tmp_path: Path) -> None:
    c, w, worker = alice
    bob = grid.client("bob", "client")
    secret = bob.data.put(make_file(tmp_path / "secret.bin", 64 * 1024, seed=3),
                          name="secret")
    mine = c.data.put(make_file(tmp_path / "mine.bin", 1000, seed=4), name="mine")
    store = grid.store
    assert store.worker_may_read(WID, mine.sha256)
    assert not store.worker_may_read(WID, secret.sha256)
    assert not store.worker_may_read("w-other", mine.sha256)  # no reservation there
    with pytest.raises(Refused) as err:  # by name: the coordinator refuses alice
        w.put_data("secret")
    assert err.value.code == "not_found"
    with pytest.raises(Refused) as err:  # by hash, straight to the worker
        w.put_data(DataRef(sha256=secret.sha256, size=secret.size, name="secret"))
    assert err.value.code == "forbidden"
    assert listing(w) == []
    assert not cache_of(worker).holds(secret.sha256)
    bob.data.share("secret", ["alice"])
    placed = w.put_data(DataRef(sha256=secret.sha256, size=secret.size, name="secret"))
    assert placed.remote == "secret"
    assert w.run("sha256sum secret").text.split()[0] == secret.sha256
    # Private again: the worker's cache still holds it, and still it is refused.
    bob.data.share("secret")
    assert cache_of(worker).holds(secret.sha256)
    with pytest.raises(Refused) as err:
        w.put_data(DataRef(sha256=secret.sha256, size=secret.size, name="secret"), "again")
    assert err.value.code == "forbidden"
    assert "again" not in listing(w)


def test_a_request_without_a_valid_grant_is_refused(
        grid: GridHarness, alice: tuple[Grid, ReservedWorker, WorkerHandle],
        tmp_path: Path) -> None:
    c, w, worker = alice
    ref = c.data.put(make_file(tmp_path / "x.bin", 1000, seed=5), name="x")
    mallory = grid.client("mallory", "client")
    inbox = grid.topics.worker_inbox(WID)
    for grant, rid in ((w.grant, w.id), ("A" * 40 + "." + "B" * 40, w.id)):
        with pytest.raises(RemoteError) as err:
            mallory.bus.request(inbox, WorkdirFetch(reservation=rid, grant=grant,
                                                    sha256=ref.sha256, path="x"), timeout=10)
        assert err.value.code == "forbidden"
    # Alice's own grant with another reservation's id.
    with pytest.raises(RemoteError) as err:
        c.bus.request(inbox, WorkdirFetch(reservation="r-0000000000000000", grant=w.grant,
                                          sha256=ref.sha256, path="x"), timeout=10)
    assert err.value.code == "forbidden"
    assert listing(w) == []
    assert cache_of(worker).fetches == 0


def test_a_path_out_of_the_work_directory_is_refused(
        alice: tuple[Grid, ReservedWorker, WorkerHandle], tmp_path: Path) -> None:
    c, w, worker = alice
    ref = c.data.put(make_file(tmp_path / "x.bin", 1000, seed=6), name="x")
    assert w.run("ln -s /etc etc-link && ln -s .. up").returncode == 0
    for remote in ("../x", "/etc/xcloud-test", "a/../../x", "etc-link/x", "up/x"):
        with pytest.raises(Refused) as err:
            w.put_data(ref, remote)
        assert err.value.code == "forbidden", remote
    assert not Path("/etc/xcloud-test").exists()
    assert cache_of(worker).fetches == 0  # refused before anything was fetched
    assert sorted(listing(w)) == ["etc-link", "up"]


def test_with_the_coordinator_down_even_a_cached_object_is_not_placed(
        grid: GridHarness, alice: tuple[Grid, ReservedWorker, WorkerHandle],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, w, worker = alice
    mine = c.data.put(make_file(tmp_path / "mine.bin", 1000, seed=9), name="mine")
    ref = DataRef(sha256=mine.sha256, size=mine.size, name="mine")
    assert w.put_data(ref).remote == "mine"  # fetched: the worker's cache holds it now
    cache = cache_of(worker)
    assert cache.holds(mine.sha256)
    assert cache.fetches == 1
    # (the rights check waits this long for the coordinator's answer)
    monkeypatch.setattr(workdir_fetch, "CHECK_TIMEOUT_S", 1.0)
    grid.stop_coordinator()
    with pytest.raises(Refused) as err:  # by hash, straight to the worker
        w.put_data(ref, "again")
    assert err.value.code == "unavailable"
    assert "did not answer" in str(err.value)
    assert sorted(listing(w)) == ["mine"]  # the reservation still runs commands
    grid.start_coordinator()
    assert w.put_data(ref, "again").remote == "again"  # the same reservation, once back
    assert w.run("sha256sum again").text.split()[0] == mine.sha256
    assert cache.fetches == 1


def test_the_shell_verb_and_xcloud_cp(grid: GridHarness, tmp_path: Path) -> None:
    grid.start_coordinator()
    start_worker(grid, "process")
    c = grid.client("alice", "client")
    ref = c.data.put(make_file(tmp_path / "in.bin", 5000, seed=8), name="in.bin")
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(c, Console(out, err, color=False))
    shell.execute(f"reserveWorker {WID}")
    shell.execute("put data:in.bin copy.bin")
    assert "copy.bin" in out.getvalue()
    w = shell.reserved
    assert w is not None
    assert w.run("sha256sum copy.bin").text.split()[0] == ref.sha256
    # xcloud cp uses the reservation the shell holds, and keeps it.
    cp_err = io.StringIO()
    assert run_cp(grid.config_for("alice"), "data:in.bin", f"{WID}:cp/in.bin",
                  stderr=cp_err) == 0, cp_err.getvalue()
    assert "cached" in cp_err.getvalue()
    assert w.run("sha256sum cp/in.bin").text.split()[0] == ref.sha256
    assert run_cp(grid.config_for("alice"), "data:in.bin", "./local", stderr=cp_err) == 2
    w.release()


def test_the_timeout_grows_with_the_size() -> None:
    assert data_timeout(0, 15.0) == 15.0
    assert data_timeout(0) == 10.0
    assert data_timeout(2_000_000_000) == pytest.approx(110.0)
