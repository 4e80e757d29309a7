"""Data objects end to end (docs/data.md): clients put and get through the coordinator
over both brokers, with the coordinator's database on SQLite (and MariaDB where the
store decides): the hash checked end to end, dedupe, quota, a wrong hash, rights, a
coordinator killed mid-upload, hostile requests, garbage collection, paging, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Incoming
from broker.transfer import Peer, TransferRefused, file_sha256
from client.api import Grid
from client.data import DataRef
from client.reservation import Refused
from schemas.data_messages import DataList, DataListReply
from schemas.messages import Error
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.coordinator_process import CoordinatorProcess
from tests.fixtures.grid import COORDINATOR, REPO, GridHarness
from tests.fixtures.services import wait_for
from tests.fixtures.transfer import close_endpoint, endpoint, gated, make_file

pytestmark = [pytest.mark.integration]

MIB = 1 << 20
SEG = 256 * 1024


def objects(grid: GridHarness) -> list[Path]:
    root = grid.tmp_path / "data" / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def partials(grid: GridHarness) -> list[Path]:
    root = grid.tmp_path / "data" / "partial"
    return sorted(root.iterdir()) if root.exists() else []


def nothing_half_stored(grid: GridHarness) -> None:
    wait_for(lambda: not partials(grid), 10, message="partial files deleted")
    assert grid.store.load_transfers() == [] or all(
        r["phase"] == "complete" for r in grid.store.load_transfers())


@BOTH_DBS
def test_a_256_mib_round_trip_keeps_every_byte(grid: GridHarness, tmp_path: Path) -> None:
    """256 MiB up and back through the coordinator's data store, on each broker and
    database (the issue's size; the embedded broker takes about three times longer)."""
    size = 256 * MIB
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    src = make_file(tmp_path / "big.bin", size)
    digest = file_sha256(src)
    seen: list[tuple[int, int]] = []
    ref = alice.data.put(src, progress=lambda done, total: seen.append((done, total)))
    assert (ref.sha256, ref.size, ref.name, ref.owner) == (digest, size, "big.bin", "alice")
    assert seen[-1] == (size, size)
    (stored,) = objects(grid)
    assert stored.name == digest
    assert [r.name for r in alice.data.ls()] == ["big.bin"]
    back = alice.data.get("big.bin", tmp_path / "back.bin")
    assert file_sha256(back) == digest
    assert not partials(grid)


@BOTH_DBS
def test_two_clients_with_the_same_content_make_one_object(grid: GridHarness,
                                                           tmp_path: Path) -> None:
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    bob = grid.client("bob", "client")
    src = make_file(tmp_path / "same.bin", 3 * MIB + 17)
    first = alice.data.put(src, name="a-copy")
    calls: list[tuple[int, int]] = []
    second = bob.data.put(src, name="b-copy", progress=lambda *c: calls.append(c))
    assert first.sha256 == second.sha256
    assert calls == [(second.size, second.size)]  # held already: done at once
    assert second.owner == "bob"
    assert len(objects(grid)) == 1
    assert sorted(e.owner for e in grid.store.data_entries(first.sha256)) == ["alice", "bob"]
    assert [r.name for r in bob.data.ls()] == ["b-copy"]
    # bob's copy is his own name: he reads it, and alice's stays private to her.
    assert file_sha256(bob.data.get("b-copy", tmp_path / "b.out")) == first.sha256
    with pytest.raises(Refused) as info:
        bob.data.show("a-copy", owner="alice")
    assert info.value.code == "forbidden"


def test_over_quota_is_a_clear_error_and_leaves_nothing(grid: GridHarness,
                                                        tmp_path: Path) -> None:
    grid.start_coordinator(data_quota_bytes=2 * MIB)
    alice = grid.client("alice", "client")
    alice.data.put(make_file(tmp_path / "small.bin", MIB), name="small")
    with pytest.raises(Refused) as info:
        alice.data.put(make_file(tmp_path / "big.bin", 2 * MIB, seed=7))
    assert info.value.code == "quota_exceeded"
    assert "alice stores 1.0 MiB of 2.0 MiB" in str(info.value)
    assert "big.bin needs 2.0 MiB more" in str(info.value)
    assert [r.name for r in alice.data.ls()] == ["small"]
    assert len(objects(grid)) == 1
    nothing_half_stored(grid)
    # Admins are not limited by default.
    admin = grid.client()
    assert admin.data.put(tmp_path / "big.bin").size == 2 * MIB


def test_a_wrong_final_hash_leaves_nothing_visible(grid: GridHarness,
                                                    tmp_path: Path) -> None:
    grid.start_coordinator()
    alice = grid.client("alice", "client")
    src = make_file(tmp_path / "f.bin", MIB + 5)
    lie = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(TransferRefused) as info:
        alice.transfers.upload(Peer(COORDINATOR, grid.topics.coord_inbox), src,
                               purpose={"kind": "data", "name": "f.bin"}, sha256=lie)
    assert info.value.code == "hash_mismatch"
    assert alice.data.ls() == []
    assert grid.store.data_object(lie) is None
    assert objects(grid) == []
    nothing_half_stored(grid)


def test_private_data_is_refused_shared_and_public_data_allowed(
        grid: GridHarness, tmp_path: Path) -> None:
    grid.add_principals(("alice", "client"), ("bob", "client"), ("carol", "client"),
                        ("w1", "worker"))
    grid.start_coordinator()
    alice, bob, carol = (grid.client(p, "client") for p in ("alice", "bob", "carol"))
    ref = alice.data.put(make_file(tmp_path / "s.bin", 300 * 1024), name="secret")

    def refused(who: Grid, code: str = "forbidden") -> None:
        out = tmp_path / f"{who.principal}-{uuid.uuid4().hex[:6]}.refused"
        with pytest.raises(Refused) as info:
            who.data.get(ref.sha256, out)
        assert info.value.code == code, info.value
        assert not out.exists()

    refused(bob)
    with pytest.raises(Refused):
        bob.data.show(ref.sha256)
    alice.data.share("secret", ["bob"])
    assert file_sha256(bob.data.get(ref, tmp_path / "bob.out")) == ref.sha256
    assert bob.data.show(ref.sha256).share == ("bob",)
    refused(carol)
    alice.data.share("secret", public=True)
    assert file_sha256(carol.data.get(ref.sha256, tmp_path / "carol.out")) == ref.sha256
    # Only the owner (or an admin) changes rights or names.
    with pytest.raises(Refused) as info:
        carol.data.rm("secret", owner="alice")
    assert info.value.code == "forbidden"
    alice.data.share("secret")  # private again
    refused(carol)
    admin = grid.client()
    assert file_sha256(admin.data.get(ref.sha256, tmp_path / "admin.out")) == ref.sha256
    # A worker fetches only what the work it serves refers to (nothing yet), public or not.
    alice.data.share("secret", public=True)
    worker = endpoint(grid, "w1", "worker")
    try:
        with pytest.raises(TransferRefused) as tinfo:
            worker.download(Peer(COORDINATOR, grid.topics.coord_inbox),
                            {"kind": "data", "sha256": ref.sha256}, tmp_path / "w1.out")
        assert tinfo.value.code == "forbidden"
    finally:
        close_endpoint(worker)
    assert not (tmp_path / "w1.out").exists()


def test_hostile_data_requests_get_errors_and_change_nothing(grid: GridHarness) -> None:
    grid.add_principals(("alice", "client"), ("w1", "worker"))
    grid.start_coordinator()
    grid.store.put_data("alice", "kept", "a" * 64, 10)
    before = grid.store.list_data(None)
    inbox = grid.topics.client_inbox("alice")
    errors: dict[str, Error] = {}
    bus = grid.bus("alice", "client", inbox=inbox, start=False)

    def on_error(incoming: Incoming) -> None:
        if incoming.message.re is not None:
            errors[incoming.message.re] = incoming.body

    bus.on_inbox("error", on_error)
    bus.start(timeout=5)
    bad: dict[str, dict[str, Any]] = {
        "limit-0": {"type": "data.list", "limit": 0},
        "limit-huge": {"type": "data.list", "limit": 5000},
        "extra-field": {"type": "data.list", "sql": "drop table"},
        "key-too-long": {"type": "data.rm", "key": "k" * 256},
        "no-key": {"type": "data.pin"},
        "bad-access": {"type": "data.share", "key": "kept", "access": "world"},
        "share-too-many": {"type": "data.share", "key": "kept", "access": "shared",
                           "share": [f"p{i}" for i in range(65)]},
        "bad-owner": {"type": "data.rm", "key": "kept", "owner": "a/b"},
        "not-a-string": {"type": "data.show", "key": 42},
    }
    topic = grid.topics.inbox_for(grid.topics.coord_inbox, "alice")
    for mid, doc in bad.items():
        payload = {"v": 1, "id": mid, "ts": time.time(), "reply_to": inbox, **doc}
        bus.publish_bytes(topic, json.dumps(payload).encode())
    wait_for(lambda: set(bad) <= set(errors), 10, message=f"errors for {set(bad)}")
    assert {mid: errors[mid].code for mid in bad} == dict.fromkeys(bad, "invalid")
    # Well-formed but not allowed: refusals, in words.
    alice = grid.client("alice", "client")
    with pytest.raises(Refused) as info:
        alice.data.ls(all=True)
    assert info.value.code == "forbidden"
    with pytest.raises(Refused) as info:
        alice.data.share("kept", ["bob"], owner="someone")
    assert info.value.code == "forbidden"
    with pytest.raises(Refused) as info:
        alice.data.rm("missing")
    assert info.value.code == "not_found"
    assert "you have no data named or hashed 'missing'" in str(info.value)
    worker = grid.bus("w1", "worker", inbox=grid.topics.worker_inbox("w1"))
    reply = worker.request(grid.topics.coord_inbox, DataList(), raise_errors=False).body
    assert isinstance(reply, Error)
    assert reply.code == "forbidden"
    assert grid.store.list_data(None) == before


def test_list_pages_pin_and_rm(grid: GridHarness) -> None:
    grid.start_coordinator()
    for i in range(7):
        grid.store.put_data("alice", f"n{i}", f"{i:x}" * 64, i)
    grid.store.put_data("bob", "other", "f" * 64, 1)
    bus = grid.bus("alice", "client", inbox=grid.topics.client_inbox("alice"))
    page = bus.request(grid.topics.coord_inbox, DataList(limit=3, offset=3)).body
    assert isinstance(page, DataListReply)
    assert [i["name"] for i in page.items] == ["n3", "n4", "n5"]
    assert (page.total, page.more) == (7, True)
    last = bus.request(grid.topics.coord_inbox, DataList(limit=3, offset=6)).body
    assert isinstance(last, DataListReply)
    assert ([i["name"] for i in last.items], last.more) == (["n6"], None)
    alice = grid.client("alice", "client")
    assert [r.name for r in alice.data.ls()] == [f"n{i}" for i in range(7)]
    assert len(grid.client().data.ls(all=True)) == 8
    alice.data.pin("n2")
    shown = alice.data.show("n2")
    assert shown.pinned
    assert shown.refs == ({"kind": "pin", "ref": "alice", "owner": "alice"},)
    with pytest.raises(Refused) as info:
        alice.data.rm("n2")
    assert info.value.code == "conflict"
    alice.data.unpin("n2")
    assert alice.data.rm("n2") == 1
    assert alice.data.rm("3" * 64) == 1  # by hash
    assert len(alice.data.ls()) == 5


def test_garbage_collection_frees_unreferenced_expired_objects(
        grid: GridHarness, tmp_path: Path) -> None:
    coordinator = grid.start_coordinator()
    alice = grid.client("alice", "client")
    temp = alice.data.put(make_file(tmp_path / "t.bin", 100_000, seed=1), expires_s=60)
    pinned = alice.data.put(make_file(tmp_path / "p.bin", 100_000, seed=2), expires_s=60)
    alice.data.pin(pinned)
    removed = alice.data.put(make_file(tmp_path / "r.bin", 100_000, seed=3))
    kept = alice.data.put(make_file(tmp_path / "k.bin", 100_000, seed=4))
    alice.data.rm(removed)
    stale = grid.tmp_path / "data" / "partial" / "0123abcd.part"
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = grid.tmp_path / "data" / "partial" / "4567abcd.part"
    fresh.write_bytes(b"being created")
    assert len(objects(grid)) == 4
    early = coordinator.data.collect_garbage()
    assert early.expired == []
    assert early.objects == [removed.sha256]
    assert early.partials == ["0123abcd.part"]  # no record names it, and it is old
    result = coordinator.data.collect_garbage(now=time.time() + 120)
    assert result.expired == ["alice/t.bin"]
    assert result.objects == [temp.sha256]
    assert result.freed_bytes == 100_000
    assert result.partials == []
    assert sorted(p.name for p in objects(grid)) == sorted([pinned.sha256, kept.sha256])
    assert fresh.exists()
    assert [r.name for r in alice.data.ls()] == ["k.bin", "p.bin"]
    assert grid.store.data_object(temp.sha256) is None


# ------------------------------------------------------------- a coordinator process


@pytest.fixture
def coordinator_process(grid: GridHarness) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(grid)
    try:
        yield process
    finally:
        process.stop()


@BOTH_DBS
def test_an_upload_survives_a_coordinator_killed_mid_way(
        grid: GridHarness, coordinator_process: CoordinatorProcess, tmp_path: Path) -> None:
    grid.add_principals(("alice", "client"))
    coordinator_process.start()
    alice = grid.client("alice", "client")
    kind = gated(pause_at=20)
    alice.transfers.outgoing_type = kind
    src = make_file(tmp_path / "in.bin", 8 * MIB)
    digest = file_sha256(src)
    done: list[DataRef | BaseException] = []

    def put() -> None:
        try:
            done.append(alice.data.put(src, name="survivor"))
        except BaseException as err:  # reported below
            done.append(err)

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    assert kind.paused.wait(20), "the upload reached its pause"

    def durable() -> int:
        rows = grid.store.load_transfers()
        return sum(end - start for r in rows for start, end in r["have"])

    wait_for(lambda: durable() >= 8 * SEG, 15, message="acknowledged ranges in the DB")
    coordinator_process.kill()
    held = [(start, end) for r in grid.store.load_transfers() for start, end in r["have"]]
    sent_before = len(kind.offsets)
    assert grid.store.find_data("alice", "survivor") == []
    coordinator_process.start()
    kind.gate.set()
    thread.join(90)
    assert done, "the upload finished"
    ref = done[0]
    assert isinstance(ref, DataRef), ref
    assert ref.sha256 == digest
    (entry,) = grid.store.find_data("alice", "survivor")
    assert entry.sha256 == digest
    path = grid.tmp_path / "data" / "objects" / digest[:2] / digest[2:4] / digest
    assert file_sha256(path) == digest
    assert not partials(grid)
    # What the dead coordinator had made durable was not sent again.
    again = [o for o in kind.offsets[sent_before:] if any(a <= o < b for a, b in held)]
    assert again == [], f"resent durable segments {again} (held {held})"


def test_the_cli_puts_lists_and_gets(grid: GridHarness, tmp_path: Path) -> None:
    token = grid.token("alice", "client")
    grid.start_coordinator(data_quota_bytes=2 * MIB)
    src = make_file(tmp_path / "cli.bin", MIB + 3)
    env = grid.subprocess_env(XCLOUD_HOME=str(tmp_path / "cli-home"), XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root, XCLOUD_BUS_PRINCIPAL="alice",
                              XCLOUD_BUS_TOKEN=token, XCLOUD_LOG_LEVEL="ERROR")

    def xcloud(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "client.cli", "data", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    put = xcloud("put", str(src), "--name", "from-cli", "--json")
    assert put.returncode == 0, put.stderr
    assert put.stderr == ""  # no progress bar in a pipe
    (ref,) = json.loads(put.stdout)
    assert (ref["name"], ref["sha256"]) == ("from-cli", file_sha256(src))
    ls = xcloud("ls", "--json")
    assert ls.returncode == 0, ls.stderr
    assert [r["name"] for r in json.loads(ls.stdout)] == ["from-cli"]
    out = tmp_path / f"got-{uuid.uuid4().hex[:6]}.bin"
    get = xcloud("get", "from-cli", "-o", str(out))
    assert get.returncode == 0, get.stderr
    assert file_sha256(out) == ref["sha256"]
    over = xcloud("put", str(make_file(tmp_path / "over.bin", MIB, seed=9)))
    assert over.returncode == 1
    assert over.stderr == (
        f"xcloud: error: cannot store {tmp_path / 'over.bin'} on the coordinator: quota "
        "exceeded: alice stores 1.0 MiB of 2.0 MiB, and over.bin needs 1.0 MiB more; "
        "remove data (`xcloud data rm`) or ask an admin for more room\n")
    missing = xcloud("get", "nothing-here")
    assert missing.returncode == 1
    assert missing.stderr.startswith("xcloud: error:")
    assert "no data named" in missing.stderr
    assert "Traceback" not in missing.stderr

