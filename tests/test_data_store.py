"""The data store (coordinator/store/data.py) and the coordinator's transfer storage
(coordinator/data_sink.py), on SQLite and MariaDB, without a bus: names, dedupe, quota,
references, garbage candidates, transfer records, atomic completion, rights."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.acl import Role
from broker.transfer import Offer, TransferPhase, TransferRecord, TransferRefused
from coordinator.data_sink import DataFiles, DataSink, DataSource, Quota, may_worker_read
from coordinator.store import Store
from tests.fixtures.backends import BOTH_DBS

MIB = 1 << 20
ROLES = {"alice": Role.CLIENT, "bob": Role.CLIENT, "carol": Role.CLIENT,
         "root": Role.ADMIN, "w1": Role.WORKER}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as opened:
        yield opened


@pytest.fixture
def files(tmp_path: Path) -> DataFiles:
    return DataFiles(tmp_path / "data")


def sink_of(store: Store, files: DataFiles, quota: int = 10 * MIB) -> DataSink:
    return DataSink(store, files, Quota(quota), ROLES.get)


def offer(peer: str, data: bytes, name: str = "f", tid: str = "tid00001",
          **purpose: object) -> Offer:
    return Offer(peer=peer, tid=tid, direction="upload", name=name, size=len(data),
                 sha256=sha(data), segment_size=4096,
                 purpose={"kind": "data", "name": name, **purpose})


def record_of(o: Offer) -> TransferRecord:
    return TransferRecord(tid=o.tid, peer=o.peer, peer_inbox=f"x/client/{o.peer}/inbox",
                          direction="upload", name=o.name, size=o.size, sha256=o.sha256,
                          segment_size=o.segment_size, purpose=dict(o.purpose))


def receive(sink: DataSink, o: Offer, data: bytes) -> dict[str, object]:
    """What the engine does around a sink: admit, save, write the partial, complete."""
    admission = sink.admit(o)
    assert admission.ref is None
    record = record_of(o)
    sink.save_state(record)
    partial = sink.partial_path(record)
    partial.write_bytes(data)
    return sink.complete(record, partial)


@BOTH_DBS
def test_names_dedupe_usage_and_references(store: Store) -> None:
    a, b = "a" * 64, "b" * 64
    first = store.put_data("alice", "one", a, 100)
    store.put_data("alice", "two", a, 100)  # same content, second name
    store.put_data("alice", "three", b, 50, access="shared", share=["bob", "carol"])
    store.put_data("bob", "mine", a, 100)
    assert store.data_usage("alice") == (150, 0)  # distinct objects, not names
    assert [e.name for e in store.find_data("alice", a[:8])] == ["one", "two"]
    assert store.find_data("alice", "three")[0].share == ("bob", "carol")
    assert store.find_data("alice", "three")[0].readable_by("carol")
    assert not store.find_data("alice", "one")[0].readable_by("bob")
    # A name given again points at the new content.
    moved = store.put_data("alice", "one", b, 50)
    assert (moved.id, moved.sha256) == (first.id, b)
    assert store.data_usage("alice") == (150, 0)
    # Nothing is garbage while names or references hold it.
    assert store.unreferenced_objects() == []
    store.remove_data([e.id for e in store.find_data("bob", "mine")])
    store.remove_data([e.id for e in store.find_data("alice", "two")])
    assert [o.sha256 for o in store.unreferenced_objects()] == [a]
    assert store.add_data_ref(a, "pin", "alice", "alice")
    assert not store.add_data_ref(a, "pin", "alice", "alice")
    assert store.unreferenced_objects() == []
    assert store.data_refs(a) == [("pin", "alice", "alice")]
    assert store.remove_data_ref(a, "pin", "alice")
    assert store.forget_object(a)
    assert store.data_object(a) is None
    assert not store.forget_object(b)  # still named


@BOTH_DBS
def test_expiry_spares_pinned_objects(store: Store) -> None:
    a, b = "a" * 64, "b" * 64
    store.put_data("alice", "old", a, 10, expires_at=100.0)
    store.put_data("alice", "kept", b, 10, expires_at=100.0)
    store.add_data_ref(b, "pin", "alice", "alice")
    assert store.expire_data(now=50.0) == []
    gone = store.expire_data(now=200.0)
    assert [e.name for e in gone] == ["old"]
    assert [e.name for e in store.list_data("alice")[0]] == ["kept"]
    assert store.list_data("alice")[0][0].pinned


@BOTH_DBS
def test_transfer_records_persist_and_progress_updates_one_row(store: Store) -> None:
    o = offer("alice", b"x" * 10000)
    record = record_of(o)
    store.save_transfer(record.to_json())
    store.save_transfer(record.to_json())  # saved again: replaced, not duplicated
    assert store.data_usage("alice") == (0, 10000)  # an upload reserves its size
    assert store.data_usage("alice", exclude_tid=o.tid) == (0, 0)
    record.have = [[0, 4096], [8192, 10000]]
    store.save_transfer_have("alice", o.tid, record.have, 5.0)
    (loaded,) = store.load_transfers()
    back = TransferRecord.from_json(loaded)
    assert back.have == [[0, 4096], [8192, 10000]]
    assert (back.purpose, back.sha256, back.phase) == (o.purpose, o.sha256,
                                                        TransferPhase.RECEIVING)
    record.move(TransferPhase.COMPLETE)
    record.ref = {"sha256": o.sha256, "size": o.size}
    store.save_transfer(record.to_json())
    assert store.data_usage("alice") == (0, 0)  # a finished one reserves nothing
    assert TransferRecord.from_json(store.load_transfers()[0]).ref == record.ref
    store.drop_transfer("alice", o.tid)
    assert store.load_transfers() == []


@BOTH_DBS
def test_the_sink_stores_atomically_and_dedupes(store: Store, files: DataFiles) -> None:
    sink = sink_of(store, files)
    data = os.urandom(3 * 4096 + 5)
    o = offer("alice", data, "in.dat")
    record = record_of(o)
    assert sink.admit(o).ref is None
    sink.save_state(record)
    partial = sink.partial_path(record)
    assert partial.parent == files.partial
    partial.write_bytes(data)
    assert store.find_data("alice", "in.dat") == []  # nothing visible before complete
    ref = sink.complete(record, partial)
    assert ref["sha256"] == o.sha256
    assert ref["name"] == "in.dat"
    path = files.object_path(o.sha256)
    assert path == files.objects / o.sha256[:2] / o.sha256[2:4] / o.sha256
    assert path.read_bytes() == data
    assert not partial.exists()
    # bob offers the same bytes: done at once, under his name, no second copy.
    again = sink.admit(offer("bob", data, "copy", tid="tid00002"))
    assert again.ref is not None
    assert again.ref["owner"] == "bob"
    assert [e.owner for e in store.data_entries(o.sha256)] == ["alice", "bob"]
    assert len(list(files.objects.rglob("*"))) == 3  # ab/, ab/cd/, the file


@BOTH_DBS
def test_the_sink_refuses_by_role_owner_purpose_and_quota(store: Store,
                                                           files: DataFiles) -> None:
    sink = sink_of(store, files, quota=MIB)
    small = b"s" * 1000
    with pytest.raises(TransferRefused) as info:
        sink.admit(offer("w1", small))
    assert info.value.code == "forbidden"
    with pytest.raises(TransferRefused) as info:
        sink.admit(offer("alice", small, owner="bob"))
    assert info.value.code == "forbidden"
    assert sink.admit(offer("root", small, owner="bob")).ref is None  # admins may
    with pytest.raises(TransferRefused) as info:
        sink.admit(Offer("alice", "tid00001", "upload", "f", 1, sha(b"x"), 4096,
                         {"kind": "workdir", "path": "x"}))
    assert info.value.code == "unsupported"
    big = b"b" * (MIB + 1)
    with pytest.raises(TransferRefused) as info:
        sink.admit(offer("alice", big, "big.bin"))
    assert info.value.code == "quota_exceeded"
    assert "alice stores 0 B of 1.0 MiB" in str(info.value)
    assert "big.bin needs 1.0 MiB more" in str(info.value)
    # Two uploads that each fit but not together: the second is refused at admit...
    half = b"h" * (600 * 1024)
    first = offer("alice", half, "a", tid="tid0000a")
    assert sink.admit(first).ref is None
    sink.save_state(record_of(first))
    second = offer("alice", half[:-1] + b"!", "b", tid="tid0000b")
    with pytest.raises(TransferRefused) as info:
        sink.admit(second)
    assert "in unfinished uploads" in str(info.value)
    # ...and one admitted before the other completed is refused at complete: nothing kept.
    sink.drop_state(record_of(first))
    assert sink.admit(second).ref is None
    receive(sink, first, half)
    record = record_of(second)
    partial = sink.partial_path(record)
    partial.write_bytes(half[:-1] + b"!")
    with pytest.raises(TransferRefused) as info:
        sink.complete(record, partial)
    assert info.value.code == "quota_exceeded"
    assert store.find_data("alice", "b") == []
    assert not files.object_path(second.sha256).exists()


@BOTH_DBS
def test_the_source_follows_the_rights(store: Store, files: DataFiles) -> None:
    sink = sink_of(store, files)
    source = DataSource(store, files, ROLES.get)
    data = b"secret" * 100
    digest = sha(data)
    receive(sink, offer("alice", data, "s.txt"), data)
    by_hash = {"kind": "data", "sha256": digest}
    assert source.open_fetch("alice", by_hash).path.read_bytes() == data
    assert source.open_fetch("alice", {"kind": "data", "name": "s.txt"}).size == len(data)
    for who in ("bob", "w1"):
        with pytest.raises(TransferRefused) as info:
            source.open_fetch(who, by_hash)
        assert info.value.code == "forbidden"
    with pytest.raises(TransferRefused) as info:
        source.open_fetch("bob", {"kind": "data", "name": "s.txt", "owner": "alice"})
    assert info.value.code == "forbidden"
    assert source.open_fetch("root", by_hash).sha256 == digest  # admins see all
    (entry,) = store.find_data("alice", "s.txt")
    store.set_data_access([entry.id], "shared", ["bob"])
    assert source.open_fetch("bob", {"kind": "data", "name": "s.txt", "owner": "alice"}
                             ).sha256 == digest
    with pytest.raises(TransferRefused):
        source.open_fetch("carol", by_hash)
    store.set_data_access([entry.id], "public")
    assert source.open_fetch("carol", by_hash).sha256 == digest
    # Workers read only what their work refers to; nothing does yet (the hook).
    assert not may_worker_read("w1", digest)
    with pytest.raises(TransferRefused) as info:
        source.open_fetch("w1", by_hash)
    assert info.value.code == "forbidden"
    allowing = DataSource(store, files, ROLES.get, worker_may_read=lambda w, _s: w == "w1")
    store.set_data_access([entry.id], "private")
    assert allowing.open_fetch("w1", by_hash).sha256 == digest
    with pytest.raises(TransferRefused) as info:
        source.open_fetch("alice", {"kind": "data", "sha256": "c" * 64})
    assert info.value.code == "not_found"


def test_transfers_draw_from_the_request_bucket(store: Store, files: DataFiles) -> None:
    empty = DataSink(store, files, Quota(MIB), ROLES.get, rate=lambda _p: 0.5)
    with pytest.raises(TransferRefused) as info:
        empty.admit(offer("alice", b"x"))
    assert info.value.code == "rate_limited"
    assert "retry in 0.5s" in str(info.value)
    source = DataSource(store, files, ROLES.get, rate=lambda _p: 0.5)
    with pytest.raises(TransferRefused) as info:
        source.open_fetch("alice", {"kind": "data", "sha256": "c" * 64})
    assert info.value.code == "rate_limited"


@BOTH_DBS
def test_a_popular_content_costs_a_probe_not_a_scan(store: Store, files: DataFiles,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep whose jobs all write the same output gives one content hundreds of names:
    an upload of it (does the owner hold it already?), a fetch by hash, and a worker's
    fetch read a row or two of them, not all (each upload was slower than the one before:
    every name was read and built in Python), and still pick the right name."""
    from coordinator.store import data as data_store

    sink = sink_of(store, files)
    source = DataSource(store, files, ROLES.get, worker_may_read=lambda _w, _s: True)
    data = b"ok\n"
    digest = sha(data)
    receive(sink, offer("alice", data, "out-0000"), data)
    for i in range(1, 300):
        store.put_data("alice", f"out-{i:04d}", digest, len(data))
    store.put_data("bob", "shared-with-carol", digest, len(data), access="shared",
                   share=["carol"])
    built: list[str] = []
    real = data_store._entry

    def counted(row: object, pinned: bool = False) -> data_store.DataRecord:
        built.append(str(getattr(row, "name", "")))
        return real(row, pinned)

    monkeypatch.setattr(data_store, "_entry", counted)
    assert sink.admit(offer("alice", data, "out-0300", tid="tid00002")).ref is not None
    assert source.open_fetch("alice", {"kind": "data", "sha256": digest}).name == "out-0000"
    assert source.open_fetch("carol", {"kind": "data", "sha256": digest}
                             ).name == "shared-with-carol"
    assert source.open_fetch("w1", {"kind": "data", "sha256": digest}).sha256 == digest
    with pytest.raises(TransferRefused) as info:
        source.open_fetch("dave", {"kind": "data", "sha256": digest})
    assert info.value.code == "forbidden"
    assert len(built) <= 8, built  # (it built all 301 names for each of them)


def test_a_sweeps_results_read_the_owners_usage_once(store: Store, files: DataFiles,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The sum of an owner's stored bytes reads every name it has (11 ms with 10,000): it
    is read once per USAGE_FRESH_S, and what is stored meanwhile adds to it, so the quota
    still holds; a removal frees room once the sum is read again."""
    from coordinator import data_sink as sink_module

    sink = sink_of(store, files, quota=100)
    reads: list[str] = []
    real = store.data_stored

    def counted(owner: str) -> int:
        reads.append(owner)
        return real(owner)

    monkeypatch.setattr(store, "data_stored", counted)
    for i in range(9):  # 9 x 10 bytes, each a new content: one read of the sum
        sink.put_small("alice", {"kind": "data", "name": f"r{i}"}, b"%09d\n" % i)
    assert reads == ["alice"]
    with pytest.raises(TransferRefused) as info:  # 90 stored + 11 > 100, with no read
        sink.admit(offer("alice", b"0123456789\n", "r9", tid="tid00009"))
    assert info.value.code == "quota_exceeded"
    assert reads == ["alice"]
    entries, _total = store.list_data("alice")
    assert store.remove_data([e.id for e in entries if e.name in ("r0", "r1")]) == 2
    with pytest.raises(TransferRefused):  # the sum is not read again yet
        sink.admit(offer("alice", b"0123456789\n", "r9", tid="tid00010"))
    monkeypatch.setattr(sink_module, "USAGE_FRESH_S", 0.0)  # (as USAGE_FRESH_S later)
    assert sink.admit(offer("alice", b"0123456789\n", "r9", tid="tid00011")).ref is None
    assert reads == ["alice", "alice"]
