"""The transfer engine's pure parts: byte ranges, segment topics, bitmaps, settings, the
persistent record and its state machine, the JSON state store, the download sink.

No broker here; tests/test_transfer.py runs the protocol on both brokers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest

from broker.transfer import (
    ByteRanges,
    FileDownloadSink,
    JsonStateStore,
    Offer,
    TransferPhase,
    TransferRecord,
    TransferRefused,
    TransferSettings,
)
from broker.transfer.segments import (
    bitmap_to_ranges,
    parse_segment_topic,
    ranges_to_bitmap,
    segment_count,
    segment_length,
    segment_offsets,
    segment_ranges,
    valid_sha256,
    valid_tid,
)
from broker.transfer.state import TRANSFER_MOVES
from schemas.topics import Topics
from schemas.transitions import InvalidTransition

BASE = "xcloud/coord/xfer"
SHA = hashlib.sha256(b"").hexdigest()


# ----------------------------------------------------------------------------- ranges


def test_ranges_merge_touching_and_overlapping() -> None:
    r = ByteRanges()
    assert r.add(10, 20) == 10
    assert r.add(30, 40) == 10
    assert r.add(20, 30) == 10  # fills the gap exactly: one range
    assert list(r) == [(10, 40)]
    assert r.add(5, 15) == 5
    assert r.add(12, 18) == 0
    assert list(r) == [(5, 40)]
    assert r.add(50, 50) == 0
    assert r.add(60, 55) == 0
    assert r.total() == 35
    assert len(r) == 1


def test_ranges_cover_prefix_missing_intersection() -> None:
    r = ByteRanges([(0, 10), (20, 30), (40, 50)])
    assert r.covers(0, 10)
    assert r.covers(22, 28)
    assert r.covers(5, 5)
    assert not r.covers(5, 15)
    assert not r.covers(10, 20)
    assert not r.covers(45, 51)
    assert r.prefix_end() == 10
    assert ByteRanges([(1, 5)]).prefix_end() == 0
    assert list(r.missing(60)) == [(10, 20), (30, 40), (50, 60)]
    assert list(r.missing(45)) == [(10, 20), (30, 40)]
    assert list(ByteRanges().missing(7)) == [(0, 7)]
    assert list(ByteRanges.whole(7).missing(7)) == []
    other = ByteRanges([(5, 25), (45, 100)])
    assert list(r.intersection(other)) == [(5, 10), (20, 25), (45, 50)]
    assert r.would_split(12, 18)
    assert not r.would_split(10, 12)


def test_ranges_match_a_set_model() -> None:
    rng = random.Random(5)
    for _ in range(200):
        model: set[int] = set()
        r = ByteRanges()
        for _ in range(30):
            s = rng.randrange(0, 200)
            e = s + rng.randrange(0, 30)
            added = r.add(s, e)
            new = set(range(s, e)) - model
            assert added == len(new)
            model |= new
        assert r.total() == len(model)
        assert {b for s, e in r for b in range(s, e)} == model
        pairs = list(r)
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs)), "merged"
        assert {b for s, e in r.missing(250) for b in range(s, e)} == set(range(250)) - model


def test_ranges_from_the_wire_are_checked() -> None:
    assert list(ByteRanges.from_wire([[0, 5], [5, 9]], 10)) == [(0, 9)]
    for bad in ([[0, 11]], [[5, 5]], [[-1, 3]], [[3, 2]], [[0, 1, 2]]):
        with pytest.raises(ValueError, match="range"):
            ByteRanges.from_wire(bad, 10)


def test_ranges_on_the_wire_are_bounded() -> None:
    r = ByteRanges((i * 10, i * 10 + 5) for i in range(300))
    pairs, more = r.to_wire(256)
    assert len(pairs) == 256
    assert more
    assert pairs[0] == [0, 5]
    pairs, more = ByteRanges([(0, 5)]).to_wire(256)
    assert pairs == [[0, 5]]
    assert not more


# ----------------------------------------------------------------------------- segments


def test_segment_topics_round_trip() -> None:
    topic = Topics.xfer_segment(BASE, "alice", "tid12345", 262144, 0xDEADBEEF)
    assert topic == f"{BASE}/alice/tid12345/262144/deadbeef"
    addr = parse_segment_topic(BASE, topic)
    assert addr is not None
    assert (addr.sender, addr.tid, addr.offset, addr.crc32) == (
        "alice", "tid12345", 262144, 0xDEADBEEF)
    assert Topics("xcloud").xfer_for_inbox("xcloud/worker/w1/inbox") == "xcloud/worker/w1/xfer"
    assert Topics("xcloud").xfer_for_inbox("xcloud/coord/inbox") == BASE
    with pytest.raises(ValueError, match="not a base inbox"):
        Topics("xcloud").xfer_for_inbox("xcloud/worker/w1/status")


@pytest.mark.parametrize("rest", [
    "alice/tid12345/0",  # too few levels
    "alice/tid12345/0/00000000/x",  # too many
    "alice/tid12345/-1/00000000",
    "alice/tid12345/01/00000000",  # leading zero: one offset, one spelling
    "alice/tid12345/1e3/00000000",
    "alice/tid12345/１/00000000",  # non-ASCII digit
    "alice/tid12345/" + "9" * 20 + "/00000000",
    "alice/tid12345/0/0000000",  # 7 hex digits
    "alice/tid12345/0/DEADBEEF",  # upper case
    "alice/tid12345/0/0000000g",
    "alice/short/0/00000000",  # tid under 8 chars
    "alice/tid 12345/0/00000000",
    "/tid12345/0/00000000",  # empty sender
])
def test_malformed_segment_topics_are_refused(rest: str) -> None:
    assert parse_segment_topic(BASE, f"{BASE}/{rest}") is None


def test_segment_topic_must_be_under_the_base() -> None:
    assert parse_segment_topic(BASE, "xcloud/coord/xfers/alice/tid12345/0/00000000") is None
    assert parse_segment_topic(BASE, "xcloud/worker/w/xfer/alice/tid12345/0/00000000") is None


def test_segment_geometry() -> None:
    assert segment_length(0, 10, 4) == 4
    assert segment_length(8, 10, 4) == 2
    assert segment_length(4, 10, 4) == 4
    for offset in (2, 10, 12, -4):
        assert segment_length(offset, 10, 4) is None
    assert segment_count(0, 4) == 0
    assert segment_count(8, 4) == 2
    assert segment_count(9, 4) == 3
    assert list(segment_offsets(ByteRanges([(0, 10)]), 10, 4)) == [0, 4, 8]
    assert list(segment_offsets(ByteRanges([(5, 6), (6, 7), (9, 10)]), 10, 4)) == [4, 8]
    assert list(segment_offsets(ByteRanges([(1, 2), (3, 5)]), 10, 4)) == [0, 4]
    assert list(segment_ranges(ByteRanges([(5, 6)]), 10, 4)) == [(4, 8)]
    assert list(segment_ranges(ByteRanges([(9, 10)]), 10, 4)) == [(8, 10)]


def test_bitmaps_name_missing_blocks() -> None:
    size, seg = 10 * 4 + 1, 4  # 11 blocks
    missing = ByteRanges([(0, 4), (12, 13), (40, 41)])
    bitmap = ranges_to_bitmap(missing, size, seg)
    back = bitmap_to_ranges(bitmap, size, seg)
    assert list(back) == [(0, 4), (12, 16), (40, 41)]
    assert list(bitmap_to_ranges(ranges_to_bitmap(ByteRanges(), size, seg), size, seg)) == []
    with pytest.raises(ValueError, match="not base64"):
        bitmap_to_ranges("!!", size, seg)
    with pytest.raises(ValueError, match="longer than"):
        bitmap_to_ranges("AAAA", size, seg)  # 3 bytes: more than 11 blocks need
    with pytest.raises(ValueError, match="names block"):
        bitmap_to_ranges("AP8=", size, seg)  # blocks 8..15 set; only 0..10 exist


def test_identifier_shapes() -> None:
    assert valid_tid("a" * 8)
    assert valid_tid("A-b_9" * 12)
    assert not valid_tid("a" * 7)
    assert not valid_tid("a" * 65)
    assert not valid_tid("abc/defgh")
    assert valid_sha256(SHA)
    assert not valid_sha256(SHA.upper())
    assert not valid_sha256("x" * 64)


def test_settings_refuse_nonsense() -> None:
    TransferSettings()
    for bad in ({"segment_size": 100}, {"segment_size": 4 << 20}, {"window": 0},
                {"max_wire_ranges": 300}, {"max_gaps": 4, "window": 16},
                {"resend_after_s": 0}):
        with pytest.raises(ValueError, match="must"):
            TransferSettings(**bad)  # type: ignore[arg-type]
    s = TransferSettings()
    assert s.fits(256 * 1024, 4 << 20)
    assert not s.fits(2 << 20, 2 << 20)


# ----------------------------------------------------------------------------- records


def record(**kw: object) -> TransferRecord:
    fields: dict[str, object] = dict(
        tid="tid12345", peer="alice", peer_inbox="xcloud/client/alice/inbox",
        direction="upload", name="f.bin", size=100, sha256=SHA, segment_size=4096,
        purpose={"kind": "file"})
    fields.update(kw)
    return TransferRecord(**fields)  # type: ignore[arg-type]


def test_record_json_round_trip_and_validation() -> None:
    rec = record(have=[[0, 50]])
    back = TransferRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec
    assert back.phase is TransferPhase.RECEIVING
    for broken in ({**rec.to_json(), "have": [[0, 500]]}, {**rec.to_json(), "phase": "x"},
                   {k: v for k, v in rec.to_json().items() if k != "size"}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            TransferRecord.from_json(broken)


def test_transfer_states_follow_their_table() -> None:
    assert set(TRANSFER_MOVES) == set(TransferPhase), "every state has a row"
    assert {s for s, to in TRANSFER_MOVES.items() if not to} == {
        TransferPhase.COMPLETE, TransferPhase.FAILED, TransferPhase.ABORTED}
    assert all(s not in to for s, to in TRANSFER_MOVES.items()), "no self-transitions"
    for end in (TransferPhase.COMPLETE, TransferPhase.FAILED, TransferPhase.ABORTED):
        rec = record()
        rec.move(end)
        rec.move(end)  # staying is no move
        for other in set(TransferPhase) - {end}:
            with pytest.raises(InvalidTransition, match="is not allowed"):
                rec.move(other)


def test_json_state_store(tmp_path: Path) -> None:
    store = JsonStateStore(tmp_path / "states")
    assert list(store) == []
    a = record()
    b = record(tid="tid67890", peer="../../etc", have=[[0, 10]])
    store.save(a)
    store.save(b)
    assert all(p.parent == tmp_path / "states" for p in (tmp_path / "states").iterdir())
    assert sorted(r.tid for r in store) == ["tid12345", "tid67890"]
    assert store.load("../../etc", "tid67890") == b
    (tmp_path / "states" / f"junk{JsonStateStore.SUFFIX}").write_text("{not json")
    assert len(list(store)) == 2, "an unreadable state is skipped"
    store.delete(a)
    assert [r.tid for r in store] == ["tid67890"]
    assert not list((tmp_path / "states").glob(".*.tmp"))


def test_file_download_sink(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    sink = FileDownloadSink(dest, expected_sha256=SHA, max_size=50)
    offer = Offer(peer="hub", tid="tid12345", direction="download", name="x", size=10,
                  sha256=SHA, segment_size=4096, purpose={"kind": "file"})
    assert sink.admit(offer).ref is None
    with pytest.raises(TransferRefused) as info:
        sink.admit(Offer(**{**offer.__dict__, "sha256": "ab" * 32}))
    assert info.value.code == "conflict"
    with pytest.raises(TransferRefused) as info:
        sink.admit(Offer(**{**offer.__dict__, "size": 51}))
    assert info.value.code == "too_large"
    rec = record(direction="download", peer="hub", size=0)
    partial = sink.partial_path(rec)
    assert partial.parent == tmp_path
    assert partial.name.startswith(".out.bin.")
    sink.save_state(rec)
    assert [r.tid for r in sink.load_states()] == ["tid12345"]
    partial.write_bytes(b"")
    ref = sink.complete(rec, partial)
    assert dest.exists()
    assert not partial.exists()
    assert ref["path"] == str(dest)
    sink.drop_state(rec)
    assert list(sink.load_states()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"], "nothing left beside"


def loaded(store: JsonStateStore) -> TransferRecord:
    found = store.load("alice", "tid12345")
    assert found is not None
    return found


def test_state_journal_keeps_acknowledged_ranges_cheaply(tmp_path: Path) -> None:
    store = JsonStateStore(tmp_path)
    rec = record(size=1000)
    store.save(rec)
    for end in (100, 200, 300):
        rec.have = [[0, end]]
        store.save_have(rec)
    journal = next(tmp_path.glob(f"*{JsonStateStore.JOURNAL}"))
    assert loaded(store) == rec, "the journal's last line wins"
    with open(journal, "ab") as fh:  # a crash tore the last append
        fh.write(b'[[0,4')
    assert loaded(store).have == [[0, 300]]
    rec.have = [[0, 300], [500, 600]]
    store.save(rec)  # compacts: the record holds everything
    assert not journal.exists()
    assert loaded(store).have == [[0, 300], [500, 600]]
    rec.have = [[0, 100]]  # an older journal line never shrinks what the record says
    store.save_have(rec)
    assert loaded(store).have == [[0, 300], [500, 600]]
    store.delete(rec)
    assert list(tmp_path.iterdir()) == []


def test_state_journal_is_compacted(tmp_path: Path) -> None:
    store = JsonStateStore(tmp_path)
    rec = record(size=10**12)
    store.save(rec)
    for i in range(1, 200):
        rec.have = [[j * 10, j * 10 + 5] for j in range(i % 200)] + [[10**6, 10**6 + i]]
        store.save_have(rec)
    journals = list(tmp_path.glob(f"*{JsonStateStore.JOURNAL}"))
    assert all(j.stat().st_size <= JsonStateStore.COMPACT_BYTES + 4096 for j in journals)
    assert loaded(store).have == rec.have
