"""The transfer protocol end to end, on both brokers with real principals and the ACL.

Two (or three) ``TransferEndpoint``s on buses of a ``grid`` (tests/fixtures/grid.py): a
coordinator-role ``hub`` with a file-system sink and source (tests/fixtures/transfer.py),
clients ``alice`` and ``bob``, a worker ``w1``. Hashes are checked end to end. Waiting
is on observed state (``wait_for``, events), never on sleeps.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from broker.bus import RemoteError
from broker.transfer import (
    ByteRanges,
    TransferEndpoint,
    TransferRecord,
    TransferRefused,
    TransferSettings,
    file_sha256,
)
from broker.transfer.segments import ranges_to_bitmap, segment_count
from schemas.messages import Body
from schemas.topics import Topics
from schemas.transfer_messages import (
    XferAbort,
    XferFetch,
    XferFin,
    XferInit,
    XferState,
    XferStatus,
)
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.services import wait_for
from tests.fixtures.transfer import (
    DirSink,
    DirSource,
    close_endpoint,
    endpoint,
    gated,
    make_file,
    peer_of,
)

pytestmark = [pytest.mark.integration]

KIB = 1024
MIB = 1024 * KIB
SEG = 256 * KIB
FAST = TransferSettings(resend_after_s=0.5, request_timeout_s=2.0, stall_timeout_s=30.0)


class Pair:
    """``hub`` (coordinator role: sink + source) and ``alice`` (client) on one grid."""

    def __init__(self, grid: GridHarness, tmp: Path, *, settings: TransferSettings = FAST,
                 alice_outgoing: Any = None, hub_outgoing: Any = None,
                 sink: DirSink | None = None, hub_settings: TransferSettings | None = None,
                 hub_bus: dict[str, Any] | None = None) -> None:
        self.grid = grid
        self.tmp = tmp
        self.sink = sink or DirSink(tmp / "hub")
        self.served = tmp / "served"
        self.served.mkdir(exist_ok=True)
        self.hub_settings = hub_settings or settings
        self.hub = endpoint(grid, "hub", "coordinator", sink=self.sink,
                            source=DirSource(self.served), settings=self.hub_settings,
                            outgoing=hub_outgoing, **(hub_bus or {}))
        self.alice = endpoint(grid, "alice", "client", settings=settings,
                              outgoing=alice_outgoing)
        self.to_hub = peer_of(grid, "hub", "coordinator")
        self.gates = [k.gate for k in (alice_outgoing, hub_outgoing) if k is not None]

    def restart_hub(self, outgoing: Any = None) -> TransferEndpoint:
        close_endpoint(self.hub)
        self.sink = DirSink(self.sink.root)
        self.hub = endpoint(self.grid, "hub", "coordinator", sink=self.sink,
                            source=DirSource(self.served), settings=self.hub_settings,
                            outgoing=outgoing)
        return self.hub

    def close(self) -> None:
        for gate in self.gates:  # a failed test must not leave a sender waiting
            gate.set()
        close_endpoint(self.alice)
        close_endpoint(self.hub)


@pytest.fixture
def pair(grid: GridHarness, tmp_path: Path) -> Any:
    made: list[Pair] = []

    def make(**kw: Any) -> Pair:
        p = Pair(grid, tmp_path, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def in_background(fn: Any, *args: Any, **kw: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list gets its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args, **kw))
        except BaseException as err:
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def result_of(thread: threading.Thread, out: list[Any], timeout: float = 60) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "the transfer did not end"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def request(ep: TransferEndpoint, body: Body, inbox: str | None = None) -> Any:
    return ep.bus.request(inbox or ep.bus.topics.coord_inbox, body, timeout=5).body


def error_code(ep: TransferEndpoint, body: Body, inbox: str | None = None) -> str:
    with pytest.raises(RemoteError) as info:
        request(ep, body, inbox)
    return info.value.code


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 5 * SEG + 777])
def test_upload_and_download_round_trip(pair: Any, size: int) -> None:
    p = pair()
    src = make_file(p.tmp / "in.bin", size)
    digest = file_sha256(src)
    seen: list[tuple[int, int]] = []
    result = p.alice.upload(p.to_hub, src, purpose={"kind": "file"},
                            progress=lambda done, total: seen.append((done, total)))
    assert result.ref["sha256"] == digest
    assert result.ref["size"] == size
    assert result.sent == segment_count(size, SEG)
    assert result.resent == 0
    assert file_sha256(p.sink.files / "in.bin") == digest
    assert seen
    assert seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "progress only grows"
    assert not [x for x in p.sink.partials() if x.endswith(".part")], "no partial file left"
    kept = list(p.sink.states)
    assert [r.phase.value for r in kept] == ["complete"], "kept to answer a repeated fin"

    (p.sink.files / "in.bin").rename(p.served / "in.bin")
    got: list[tuple[int, int]] = []
    back = p.alice.download(p.to_hub, {"kind": "file", "name": "in.bin"}, p.tmp / "out.bin",
                            progress=lambda done, total: got.append((done, total)))
    assert back.sha256 == digest
    assert file_sha256(p.tmp / "out.bin") == digest
    assert got
    assert got[-1] == (size, size)
    assert sorted(x.name for x in p.tmp.iterdir() if x.name.startswith(".")) == [], \
        "no partial or state left beside the download"


@pytest.mark.slow
def test_256_mib_round_trip(pair: Any) -> None:
    p = pair(settings=TransferSettings())
    src = make_file(p.tmp / "big.bin", 256 * MIB)
    digest = file_sha256(src)
    up = p.alice.upload(p.to_hub, src, purpose={"kind": "file"}, sha256=digest)
    assert up.ref["sha256"] == digest
    stored = p.sink.files / "big.bin"
    assert file_sha256(stored) == digest
    stored.rename(p.served / "big.bin")
    src.unlink()
    down = p.alice.download(p.to_hub, {"kind": "file", "name": "big.bin"}, p.tmp / "back.bin",
                            expected_sha256=digest)
    assert down.sha256 == digest
    assert file_sha256(p.tmp / "back.bin") == digest


def test_same_content_twice_completes_at_once(pair: Any) -> None:
    p = pair()
    src = make_file(p.tmp / "a.bin", 3 * SEG)
    first = p.alice.upload(p.to_hub, src, purpose={"kind": "file"})
    again = p.alice.upload(p.to_hub, src, purpose={"kind": "file"}, name="b.bin")
    assert not first.held_already
    assert again.held_already
    assert again.sent == 0
    assert again.ref == first.ref


def test_client_and_worker_pair(grid: GridHarness, tmp_path: Path) -> None:
    """client ↔ reserved worker: the worker's transfer topics and the ACL for that pair."""
    sink = DirSink(tmp_path / "w1")
    served = tmp_path / "w1-served"
    served.mkdir()
    w1 = endpoint(grid, "w1", "worker", sink=sink, source=DirSource(served), settings=FAST)
    alice = endpoint(grid, "alice", "client", settings=FAST)
    try:
        src = make_file(tmp_path / "put.bin", 3 * SEG + 5)
        digest = file_sha256(src)
        to_w1 = peer_of(grid, "w1", "worker")
        assert alice.upload(to_w1, src, purpose={"kind": "file"}).ref["sha256"] == digest
        (sink.files / "put.bin").rename(served / "put.bin")
        alice.download(to_w1, {"kind": "file", "name": "put.bin"}, tmp_path / "got.bin")
        assert file_sha256(tmp_path / "got.bin") == digest
    finally:
        close_endpoint(alice)
        close_endpoint(w1)


# ----------------------------------------------------------------------------- resume


def _child(grid: GridHarness, src: Path, tid: str, pause_at: int | None
           ) -> tuple[subprocess.Popen[str], queue.Queue[dict[str, Any]]]:
    """The uploading sender as a child process (tests/fixtures/transfer.py)."""
    cmd = [sys.executable, "-m", "tests.fixtures.transfer", "upload", "--url", grid.url,
           "--root", grid.root, "--principal", "alice", "--peer", "hub",
           "--peer-inbox", grid.topics.coord_inbox, "--file", str(src), "--tid", tid,
           "--resend-after", "0.5"]
    if pause_at is not None:
        cmd += ["--pause-at", str(pause_at)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True,
                            env=grid.subprocess_env(XCLOUD_BUS_TOKEN=grid.token("alice",
                                                                                "client")))
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                events.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    return proc, events


def test_sender_killed_resumes_without_resending_acknowledged(grid: GridHarness,
                                                              tmp_path: Path) -> None:
    sink = DirSink(tmp_path / "hub")
    hub = endpoint(grid, "hub", "coordinator", sink=sink, settings=FAST)
    src = make_file(tmp_path / "killed.bin", 48 * SEG + 99)
    total = segment_count(48 * SEG + 99, SEG)
    tid = "resume-after-kill-1"
    first, events = _child(grid, src, tid, pause_at=20)
    second: subprocess.Popen[str] | None = None
    try:
        assert events.get(timeout=30) == {"event": "paused"}
        # Mid-transfer: some of the 20 segments are acknowledged, others may be in flight.
        wait_for(lambda: sink.acked_ranges(tid), 10, message="no acknowledgement yet")
        first.kill()
        first.wait(10)
        acked = ByteRanges(sink.acked_ranges(tid))
        assert 0 < acked.total() <= 20 * SEG

        second, events = _child(grid, src, tid, pause_at=None)
        done = events.get(timeout=60)
        assert done["event"] == "done", done
        assert second.wait(10) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        close_endpoint(hub)
    second_run = done["offsets"]  # every segment the restarted sender sent
    assert second_run, "the second run had segments left to send"
    assert not [o for o in second_run if acked.covers(o, min(o + SEG, src.stat().st_size))], \
        "an acknowledged segment was sent again"
    assert len(second_run) == done["sent"] + done["resent"]
    stats = hub.receiver.stats("alice", tid)
    assert stats is not None
    assert stats.received == total
    assert stats.duplicates == 0, "the restarted sender sent only what the receiver lacked"
    assert len(second_run) < total
    assert file_sha256(sink.files / "killed.bin") == file_sha256(src)


def test_receiver_restart_mid_transfer_completes(pair: Any) -> None:
    kind = gated(pause_at=12)
    p = pair(alice_outgoing=kind)
    src = make_file(p.tmp / "r.bin", 40 * SEG)
    thread, out = in_background(p.alice.upload, p.to_hub, src, purpose={"kind": "file"},
                                tid="receiver-restart")
    assert kind.paused.wait(30)
    wait_for(lambda: ByteRanges(p.sink.acked_ranges("receiver-restart")).total() == 12 * SEG,
             10, message="the first 12 segments durable")
    p.hub.close()
    p.hub.bus.stop()
    kind.gate.set()  # segments now go nowhere: nobody subscribes
    wait_for(lambda: len(kind.offsets) >= min(40, 12 + FAST.window), 10,
             message="a window sent into the void")
    p.restart_hub()  # same directory: the state is loaded back
    result = result_of(thread, out)
    assert result.resent >= 1, "what was lost while the receiver was down was resent"
    assert file_sha256(p.sink.files / "r.bin") == file_sha256(src)
    held_before = set(range(0, 12 * SEG, SEG))
    assert not held_before & set(kind.offsets[12:]), "durable segments were not resent"


def test_downloader_restart_resumes(pair: Any) -> None:
    kind = gated(pause_at=10)
    p = pair(hub_outgoing=kind)
    make_file(p.served / "d.bin", 30 * SEG)
    dest = p.tmp / "d.bin"
    source = {"kind": "file", "name": "d.bin"}
    thread, out = in_background(p.alice.download, p.to_hub, source, dest)
    assert kind.paused.wait(30)
    wait_for(lambda: any(x.name.endswith(".part") for x in p.tmp.iterdir()), 10,
             message="a partial file beside the destination")
    wait_for(lambda: p.alice.receiver.active()
             and ByteRanges.from_wire(p.alice.receiver.active()[0].have, 30 * SEG).total()
             == 10 * SEG, 10, message="10 segments durable at the downloader")
    close_endpoint(p.alice)
    thread.join(30)
    assert isinstance(out[0], Exception), "the interrupted download failed"
    kind.gate.set()
    p.alice = endpoint(p.grid, "alice", "client", settings=FAST)
    before = len(kind.offsets)
    result = p.alice.download(p.to_hub, source, dest)
    assert file_sha256(dest) == file_sha256(p.served / "d.bin") == result.sha256
    assert set(kind.offsets[before:]).isdisjoint(range(0, 10 * SEG, SEG)), \
        "the resumed download asked only for what it lacked"


def test_holder_restart_mid_download_completes(pair: Any) -> None:
    kind = gated(pause_at=6)
    p = pair(hub_outgoing=kind)
    make_file(p.served / "h.bin", 20 * SEG)
    dest = p.tmp / "h.bin"
    thread, out = in_background(p.alice.download, p.to_hub, {"kind": "file", "name": "h.bin"},
                                dest)
    assert kind.paused.wait(30)
    wait_for(lambda: p.alice.receiver.active()
             and ByteRanges.from_wire(p.alice.receiver.active()[0].have, 20 * SEG).total()
             == 6 * SEG, 10, message="6 segments durable at the downloader")
    after = gated()
    p.restart_hub(outgoing=after)  # the paused stream dies with its endpoint
    result = result_of(thread, out)
    assert file_sha256(dest) == result.sha256 == file_sha256(p.served / "h.bin")
    assert after.offsets, "the restarted holder streamed the rest"
    assert set(after.offsets).isdisjoint(range(0, 6 * SEG, SEG)), \
        "the downloader asked the restarted holder only for what it lacked"


# ----------------------------------------------------------------------------- failures


def test_corrupted_segment_is_refused_and_resent(pair: Any) -> None:
    p = pair(alice_outgoing=gated(corrupt={3 * SEG}))
    src = make_file(p.tmp / "c.bin", 8 * SEG)
    result = p.alice.upload(p.to_hub, src, purpose={"kind": "file"})
    assert p.hub.receiver.rejected["crc"] == 1
    assert result.resent >= 1
    assert file_sha256(p.sink.files / "c.bin") == file_sha256(src)


def test_wrong_final_hash_leaves_nothing_visible(pair: Any) -> None:
    p = pair()
    src = make_file(p.tmp / "w.bin", 3 * SEG)
    with pytest.raises(TransferRefused) as info:
        p.alice.upload(p.to_hub, src, purpose={"kind": "file"}, sha256="ab" * 32)
    assert info.value.code == "hash_mismatch"
    assert "nothing was kept" in str(info.value)
    assert p.sink.visible() == []
    assert p.sink.partials() == []
    assert p.hub.receiver.active() == []


def test_refusals_are_clear_and_store_nothing(pair: Any) -> None:
    p = pair(sink=None)
    p.sink.max_size = 2 * SEG
    src = make_file(p.tmp / "q.bin", 3 * SEG)
    with pytest.raises(TransferRefused) as info:
        p.alice.upload(p.to_hub, src, purpose={"kind": "file"})
    assert info.value.code == "quota_exceeded"
    assert "quota" in str(info.value)
    assert p.sink.partials() == []
    assert p.sink.visible() == []
    with pytest.raises(TransferRefused) as info:
        p.alice.download(p.to_hub, {"kind": "file", "name": "nope"}, p.tmp / "nope")
    assert info.value.code == "not_found"
    assert not (p.tmp / "nope").exists()


def _paused_upload(p: Pair, kind: Any, size: int, tid: str) -> tuple[threading.Thread,
                                                                   list[Any]]:
    src = make_file(p.tmp / f"{tid}.bin", size)
    thread, out = in_background(p.alice.upload, p.to_hub, src, purpose={"kind": "file"},
                                tid=tid)
    assert kind.paused.wait(30)
    return thread, out


def test_bad_segments_are_dropped_and_change_nothing(pair: Any) -> None:
    kind = gated(pause_at=2)
    p = pair(alice_outgoing=kind)
    tid = "bad-segments"
    size = 6 * SEG
    thread, out = _paused_upload(p, kind, size, tid)
    wait_for(lambda: p.hub.receiver.holding("alice", tid) == ByteRanges([(0, 2 * SEG)]),
             10, message="two segments in")
    partial = p.sink.partial_dir / f"alice-{tid}.part"
    before = (partial.read_bytes(), list(p.sink.saved), dict(p.hub.receiver.rejected))
    base = p.hub.xfer_base
    good = (p.tmp / f"{tid}.bin").read_bytes()[2 * SEG:3 * SEG]
    crc = zlib.crc32(good)
    first = (p.tmp / f"{tid}.bin").read_bytes()[:SEG]
    cases = {
        "unknown": [(f"{base}/alice/unknown-tid/{2 * SEG}/{crc:08x}", good)],
        "offset": [(f"{base}/alice/{tid}/{2 * SEG + 1}/{crc:08x}", good),  # not aligned
                   (f"{base}/alice/{tid}/{size}/{crc:08x}", good)],  # past the end
        "length": [(f"{base}/alice/{tid}/{2 * SEG}/{zlib.crc32(good + b'x'):08x}",
                    good + b"x"),  # oversized
                   (f"{base}/alice/{tid}/{2 * SEG}/{zlib.crc32(good[:-1]):08x}",
                    good[:-1])],  # short
        "crc": [(f"{base}/alice/{tid}/{2 * SEG}/{crc ^ 1:08x}", good)],
        "topic": [(f"{base}/alice/{tid}/0{2 * SEG}/{crc:08x}", good),
                  (f"{base}/alice/{tid}/abc/{crc:08x}", good),
                  # upper case: `| 0xA` makes its last digit a letter (an all-digit CRC,
                  # 1 in 43 of random data, reads the same in either case and is valid)
                  (f"{base}/alice/{tid}/{2 * SEG}/{crc | 0xA:08X}", good)],
    }
    bus = p.alice.bus
    # Not even delivered: the receiver subscribes to exactly four levels.
    bus.publish_bytes(f"{base}/alice/{tid}/{2 * SEG}/{crc:08x}/extra", good).wait_for_publish(5)
    for items in cases.values():
        for topic, payload in items:
            bus.publish_bytes(topic, payload).wait_for_publish(5)
    # A replay of a segment already held: counted as a duplicate, nothing written.
    bus.publish_bytes(f"{base}/alice/{tid}/0/{zlib.crc32(first):08x}", first
                      ).wait_for_publish(5)
    expected = {reason: before[2].get(reason, 0) + len(items)
                for reason, items in cases.items()}
    wait_for(lambda: all(p.hub.receiver.rejected[r] >= n for r, n in expected.items())
             and p.hub.receiver.stats("alice", tid).duplicates == 1, 10,
             message=f"all dropped ({dict(p.hub.receiver.rejected)})")
    assert {r: p.hub.receiver.rejected[r] for r in expected} == expected
    assert p.hub.receiver.holding("alice", tid) == ByteRanges([(0, 2 * SEG)])
    assert partial.read_bytes() == before[0], "no bad segment reached the disk"
    assert all(have == [[0, 2 * SEG]] for t, have in p.sink.saved[len(before[1]):]
               if t == tid), "the state only ever said what really arrived"
    kind.gate.set()
    result = result_of(thread, out)
    assert file_sha256(p.sink.files / f"{tid}.bin") == result.sha256


def test_bad_control_messages_get_errors_and_change_nothing(pair: Any) -> None:
    kind = gated(pause_at=1)
    p = pair(alice_outgoing=kind, hub_bus={"max_payload": 2 * MIB},  # 2 MiB segments: no
             hub_settings=TransferSettings(max_active_per_peer=2, max_size=64 * MIB,
                                           resend_after_s=0.5, request_timeout_s=2.0))
    tid = "control-live"
    size = 4 * SEG
    thread, out = _paused_upload(p, kind, size, tid)
    digest = file_sha256(p.tmp / f"{tid}.bin")
    wait_for(lambda: p.hub.receiver.holding("alice", tid) == ByteRanges([(0, SEG)]), 10,
             message="one segment in")

    def kept() -> tuple[list[str], list[str]]:  # transfer states and partial files
        return sorted(r.tid for r in p.sink.states), sorted(
            x.name for x in p.sink.partial_dir.glob("*.part"))

    states_before = kept()
    fine: dict[str, Any] = dict(tid="fresh-tid-1", direction="upload", name="n", size=10,
                                sha256=digest, segment_size=SEG, purpose={"kind": "file"})
    codes = {
        "not hex": error_code(p.alice, XferInit(**{**fine, "sha256": "x" * 64})),
        "download init": error_code(p.alice, XferInit(**{**fine, "direction": "download"})),
        "too large": error_code(p.alice, XferInit(**{**fine, "size": 65 * MIB})),
        "segment": error_code(p.alice, XferInit(**{**fine, "segment_size": 2 * MIB})),
        "other file, same tid": error_code(p.alice, XferInit(**{**fine, "tid": tid})),
        "status unknown": error_code(p.alice, XferStatus(tid="no-such-tid")),
        "fin unknown": error_code(p.alice, XferFin(tid="no-such-tid", size=1, sha256=digest)),
        "fin wrong size": error_code(p.alice, XferFin(tid=tid, size=size + 1, sha256=digest)),
        "abort unknown": error_code(p.alice, XferAbort(tid="no-such-tid")),
        "fetch unknown": error_code(p.alice, XferFetch(tid="fetch-tid-1",
                                                       source={"kind": "file", "name": "x"})),
    }
    assert codes == {
        "not hex": "invalid", "download init": "invalid", "too large": "too_large",
        "segment": "invalid", "other file, same tid": "conflict",
        "status unknown": "not_found", "fin unknown": "not_found",
        "fin wrong size": "conflict", "abort unknown": "not_found",
        "fetch unknown": "not_found"}
    # A status of the live transfer is fine and says what is held.
    state = request(p.alice, XferStatus(tid=tid))
    assert isinstance(state, XferState)
    assert state.have == [[0, SEG]]
    # The per-principal limit: one open, a second is fine, a third is busy.
    second = request(p.alice, XferInit(**{**fine, "tid": "second-open"}))
    assert second.state == "receiving"
    assert error_code(p.alice, XferInit(**{**fine, "tid": "third-open"})) == "busy"
    assert request(p.alice, XferAbort(tid="second-open", reason="test")).TYPE == "ok"
    # Not even schema-valid: the edge answers invalid; too large for the bus: dropped.
    errors: dict[str, str] = {}
    p.alice.bus.on_inbox("error", lambda m: errors.__setitem__(m.message.re or "", m.body.code))
    inbox = p.alice.bus.inbox
    coord = p.alice.bus.topics.inbox_for(p.alice.bus.topics.coord_inbox, "alice")
    raw = {"type": "xfer.init", "v": 1, "ts": 1.0, "reply_to": inbox, **fine}
    huge = {**raw, "id": "huge", "name": "n" * (3 * MIB)}  # first: handled before the rest
    p.alice.bus.publish_bytes(coord, json.dumps(huge).encode()).wait_for_publish(5)
    for mid, doc in {"small-seg": {**raw, "segment_size": 100},
                     "short-sha": {**raw, "sha256": "ab"},
                     "extra": {**raw, "evil": 1},
                     "ranges": {"type": "xfer.fetch", "v": 1, "ts": 1.0, "reply_to": inbox,
                                "tid": tid, "source": {"kind": "file"},
                                "ranges": [[0, 1]] * 257}}.items():
        p.alice.bus.publish_bytes(coord, json.dumps({**doc, "id": mid}).encode())
    wait_for(lambda: len(errors) >= 4, 10, message=f"error replies ({errors})")
    assert errors == {"small-seg": "invalid", "short-sha": "invalid", "extra": "invalid",
                      "ranges": "invalid"}, "the oversized one got no answer"
    assert kept() == states_before
    assert p.hub.receiver.holding("alice", tid) == ByteRanges([(0, SEG)])
    kind.gate.set()
    result = result_of(thread, out)
    # Replays after completion: fin and init answer the same, idempotently.
    fin = XferFin(tid=tid, size=size, sha256=digest)
    assert request(p.alice, fin) == request(p.alice, fin) == XferState(
        tid=tid, state="complete", size=size, ref=result.ref)
    init = XferInit(**{**fine, "tid": tid, "size": size, "name": f"{tid}.bin"})
    assert request(p.alice, init).state == "complete"
    assert error_code(p.alice, XferFin(tid=tid, size=size, sha256="cd" * 32)) == "conflict"


def test_fetch_by_bitmap_streams_exactly_those_blocks(pair: Any) -> None:
    p = pair()
    make_file(p.served / "m.bin", 8 * SEG)
    source = {"kind": "file", "name": "m.bin"}
    desc = request(p.alice, XferFetch(tid="bitmap-tid", source=source))
    assert isinstance(desc, XferInit)
    assert desc.size == 8 * SEG
    record = TransferRecord(tid="bitmap-tid", peer="hub", peer_inbox=p.to_hub.inbox,
                            direction="download", name="m.bin", size=desc.size,
                            sha256=desc.sha256, segment_size=desc.segment_size,
                            purpose=source)
    from broker.transfer import FileDownloadSink

    assert p.alice.receiver.expect(record, FileDownloadSink(p.tmp / "m.bin")) is not None
    wanted = ByteRanges([(SEG, 2 * SEG), (5 * SEG, 6 * SEG)])
    bitmap = ranges_to_bitmap(wanted, desc.size, SEG)
    request(p.alice, XferFetch(tid="bitmap-tid", source=source, bitmap=bitmap))
    wait_for(lambda: p.alice.receiver.holding("hub", "bitmap-tid") == wanted, 10,
             message="blocks 1 and 5")
    assert error_code(p.alice, XferFetch(tid="bitmap-tid", source=source,
                                         bitmap="////")) == "invalid"
    assert error_code(p.alice, XferFetch(tid="bitmap-tid", source=source,
                                         ranges=[[0, 9 * SEG]])) == "invalid"


# ----------------------------------------------------------------------------- the ACL


def test_principals_reach_only_their_own_transfers(pair: Any, grid: GridHarness) -> None:
    kind = gated(pause_at=0)
    p = pair(alice_outgoing=kind)
    tid = "acl-target"
    thread, out = _paused_upload(p, kind, 2 * SEG, tid)
    bob = endpoint(grid, "bob", "client", settings=FAST)
    spy = grid.bus("bob", "client", start=False)  # bob's second connection: only watches
    spied: list[str] = []
    # bob subscribes to alice's and the coordinator's transfer topics (refused by amqtt at
    # SUBSCRIBE, never delivered by Mosquitto), and to his own (granted).
    for flt in (f"{grid.root}/client/alice/xfer/#", f"{grid.root}/coord/xfer/#",
                f"{grid.root}/worker/+/xfer/#", f"{grid.root}/client/bob/xfer/#"):
        spy.subscribe_raw(flt, lambda t, _b, _r: spied.append(t))
    spy.start(timeout=5)
    try:
        # ... and publishes a segment under alice's id, and one into alice's own topics.
        data = (p.tmp / f"{tid}.bin").read_bytes()[:SEG]
        forged = b"\0" * SEG
        for topic in (Topics.xfer_segment(p.hub.xfer_base, "alice", tid, 0, zlib.crc32(forged)),
                      Topics.xfer_segment(f"{grid.root}/client/alice/xfer", "bob", tid, 0,
                                          zlib.crc32(forged))):
            bob.bus.publish_bytes(topic, forged).wait_for_publish(5)
        # A segment bob may send (under its own id): it arrives, and is dropped as unknown.
        unknown_before = p.hub.receiver.rejected["unknown"]
        bob.bus.publish_bytes(Topics.xfer_segment(p.hub.xfer_base, "bob", tid, 0,
                                                  zlib.crc32(forged)), forged
                              ).wait_for_publish(5)
        wait_for(lambda: p.hub.receiver.rejected["unknown"] > unknown_before, 10,
                 message="bob's own segment routed")
        assert p.hub.receiver.holding("alice", tid) == ByteRanges(), "the forgery was not routed"
        kind.gate.set()
        result_of(thread, out)
        stored = (p.sink.files / f"{tid}.bin").read_bytes()
        assert stored[:SEG] == data
        make_file(p.served / "spy.bin", 2 * SEG)
        p.alice.download(p.to_hub, {"kind": "file", "name": "spy.bin"}, p.tmp / "spy.bin")
        # Something bob may read, sent after everything above: once it is in, bob has
        # seen all he ever will.
        marker = Topics.xfer_segment(f"{grid.root}/client/bob/xfer", "hub", "marker-tid", 0, 0)
        p.hub.bus.publish_bytes(marker, b"").wait_for_publish(5)
        wait_for(lambda: marker in spied, 10, message="bob's own marker")
        assert set(spied) == {marker}, f"bob saw other principals' segments: {spied[:3]}"
    finally:
        close_endpoint(bob)
