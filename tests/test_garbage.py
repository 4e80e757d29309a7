"""Invariant 3 on the wire: garbage on every topic the coordinator listens to.

An authenticated principal publishes malformed JSON, non-objects, wrong types, unknown
types and versions, missing and extra fields, binary noise, oversized payloads and
bodies naming another worker than the topic, into the coordinator's inbox and onto a
worker's caps/status/heartbeat topics. Each gets an ``error`` reply with the right code
when it carried a usable ``reply_to``, else it is dropped and logged. Afterwards the
coordinator still answers, every lane still works, and the database is unchanged.

The two workers here are driven by hand and announce a 600 s heartbeat, so nothing
legitimate writes to the database while the garbage flows: the before/after snapshot
compares every row of every table.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.bus import Bus, Incoming
from coordinator.service import Coordinator
from schemas.codec import DEFAULT_MAX_PAYLOAD
from schemas.messages import Error, Pong, WorkerEvent, WorkerHeartbeat, WorkerStatus
from tests.fixtures.actors import FakeWorker, minimal_caps
from tests.fixtures.grid import GridHarness, db_snapshot
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

ATTACKER = "mallory"


class Replies:
    """``error`` replies arriving in a bus's inbox, by the id of the request."""

    def __init__(self, bus: Bus) -> None:
        self.by_re: dict[str, Error] = {}
        self._lock = threading.Lock()
        bus.on_inbox("error", self._record)

    def _record(self, incoming: Incoming) -> None:
        with self._lock:
            if incoming.message.re:
                self.by_re[incoming.message.re] = incoming.body


@dataclass
class Target:
    grid: GridHarness
    coordinator: Coordinator
    good: FakeWorker
    other: FakeWorker
    attacker: Bus
    attacker_replies: Replies
    worker_replies: Replies
    caplog: pytest.LogCaptureFixture
    expected: dict[str, str] = field(default_factory=dict)  # request id -> error code

    @property
    def attacker_inbox(self) -> str:
        return self.grid.topics.client_inbox(ATTACKER)

    @property
    def coord_topic(self) -> str:
        return f"{self.grid.topics.coord_inbox}/{ATTACKER}"

    def logged(self, text: str) -> int:
        return sum(text in r.getMessage() for r in self.caplog.records)

    def barrier(self, publish: Callable[[bytes], Any]) -> None:
        """Wait until everything published before on this path has been handled.

        Lanes are FIFO: once an unknown-type marker sent after the garbage is logged
        as dropped, the garbage before it has been handled.
        """
        marker = f"barrier-{uuid.uuid4().hex[:8]}"
        publish(doc(marker, None, mid=marker))
        wait_for(lambda: self.logged(marker), 10, message=f"{marker} logged")


def doc(mtype: str, reply_to: Any, *, mid: str | None = None, v: Any = 1,
        **fields: Any) -> bytes:
    data: dict[str, Any] = {"type": mtype, "v": v, "id": mid or uuid.uuid4().hex,
                            "ts": time.time(), **fields}
    if reply_to is not None:
        data["reply_to"] = reply_to
    return json.dumps(data).encode()


@pytest.fixture
def target(grid: GridHarness, caplog: pytest.LogCaptureFixture) -> Target:
    caplog.set_level(logging.WARNING)
    grid.add_principals(("w-good", "worker"), ("w-other", "worker"), (ATTACKER, "client"))
    coordinator = grid.start_coordinator()
    good = grid.fake_worker("w-good")
    good.join(tags=["good"])
    other = grid.fake_worker("w-other")
    other.join(tags=["other"])
    settle(grid)
    attacker = grid.bus(ATTACKER, "client", inbox=grid.topics.client_inbox(ATTACKER))
    return Target(grid, coordinator, good, other, attacker, Replies(attacker),
                  Replies(good.bus), caplog)


def settle(grid: GridHarness) -> None:
    """Until the database stops moving: a join returns once the worker is online, and its
    status message may land just after (last_seen), which a test's "before" must include."""
    last = db_snapshot(grid.store)

    def still() -> bool:
        nonlocal last
        now = db_snapshot(grid.store)
        same, last = now == last, now
        return same

    wait_for(still, 10, interval=0.3, message="the joins settled in the database")


def assert_still_serving(t: Target, before: dict[str, list[str]]) -> None:
    """The coordinator answers, the database did not move, and every lane still works."""
    grid = t.grid
    admin = grid.client()
    assert isinstance(admin.ping(timeout=5), Pong)
    rows = {w.id: (w.state, w.tags) for w in admin.workers()}
    assert rows == {"w-good": ("online", ["good"]), "w-other": ("online", ["other"])}
    assert db_snapshot(grid.store) == before, "garbage changed the database"
    assert t.coordinator.registry.monitor._thread is not None
    assert t.coordinator.registry.monitor._thread.is_alive()
    # heartbeat lane and writer
    t.good.heartbeat(1)
    wait_for(lambda: (r := grid.worker_record("w-good")) and r.heartbeat_seq == 1, 5,
             message="a valid heartbeat is still recorded")
    # registry lane
    t.good.bus.publish(grid.topics.worker_caps("w-good"),
                       minimal_caps("w-good", tags=["good", "still"]), retain=True)
    wait_for(lambda: (r := grid.worker_record("w-good")) and r.tags == ["good", "still"], 5,
             message="valid caps are still recorded")


def check_replies(replies: Replies, expected: dict[str, str]) -> None:
    wait_for(lambda: set(expected) <= set(replies.by_re), 10,
             message=f"error replies for {sorted(set(expected) - set(replies.by_re))}")
    got = {mid: replies.by_re[mid].code for mid in expected}
    assert got == expected
    assert all(replies.by_re[mid].message for mid in expected)
    # (QoS 1 may deliver a message twice, so count distinct requests, not replies)
    assert set(replies.by_re) == set(expected), "a message without usable reply_to was answered"


# ----------------------------------------------------------------------- coordinator inbox


def test_garbage_in_the_coordinator_inbox(target: Target) -> None:
    t = target
    grid = t.grid
    before = db_snapshot(grid.store)
    inbox = t.attacker_inbox
    rng = random.Random(1234)
    expected: dict[str, str] = {}

    def answered(want: str, mtype: str, **fields: Any) -> bytes:
        mid = f"{want}-{len(expected)}"
        expected[mid] = want
        return doc(mtype, inbox, mid=mid, **fields)

    caps = minimal_caps("w-good").to_dict()
    with_reply = [
        answered("invalid", "workers.list", min_cpus="x"),
        answered("invalid", "workers.list", min_cpus=-1),
        answered("invalid", "workers.list", state=["bogus"]),
        answered("invalid", "workers.list", tags="gpu"),
        answered("invalid", "workers.show", worker=123),
        answered("invalid", "workers.show"),
        answered("invalid", "workers.show", worker="w-good", evil=True),
        answered("invalid", "ping", extra={"a": 1}),
        answered("invalid", "workers.show", worker="x" * 10_000),
        answered("unknown_type", "frobnicate"),
        answered("unknown_type", "workers.delete", worker="w-good"),
        answered("unsupported_version", "workers.list", v=99),
        answered("bad_envelope", "workers.list", v="1"),
        answered("bad_envelope", "workers.list", ts="yesterday"),
        answered("bad_envelope", "", worker="w-good"),
        answered("unsupported", "worker.caps", **caps),
        answered("unsupported", "worker.status", wid="w-other", state="offline", clean=True),
        answered("unsupported", "error", code="internal", message="hi"),
    ]
    no_ts = {"type": "workers.list", "v": 1, "id": "no-ts", "reply_to": inbox}
    expected["no-ts"] = "bad_envelope"
    with_reply.append(json.dumps(no_ts).encode())
    dropped = [
        b"{not json",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b"",
        b"\xff\xfe\x00garbage",
        bytes(rng.getrandbits(8) for _ in range(2048)),
        doc("workers.list", None, min_cpus="x"),  # no reply_to
        doc("workers.list", "somewhere/else", min_cpus="x"),  # reply_to not an inbox
        doc("workers.list", "otherroot/coord/inbox", min_cpus="x"),  # another grid
        doc("workers.list", inbox, mid="x" * 65, min_cpus="x"),  # id too long to echo
        doc("workers.list", 42, min_cpus="x"),  # reply_to of the wrong type
        b'{"type":"ping","v":1,"id":"deep","ts":1,"reply_to":"' + inbox.encode() + b'","x":'
        + b"[" * 100_000,  # nesting deeper than json.loads' recursion limit
        doc("ping", grid.topics.coord_inbox),  # a reply to itself must not loop
    ]
    for payload in with_reply + dropped:
        t.attacker.publish_bytes(t.coord_topic, payload)
    t.barrier(lambda p: t.attacker.publish_bytes(t.coord_topic, p))

    check_replies(t.attacker_replies, expected)
    # Every edge rejection is logged: all of with_reply but the 3 "unsupported" (those
    # pass the edge), all of dropped but the recursion bomb and the self-addressed ping.
    edge_rejects = t.logged(f"dropped message on {t.coord_topic}")
    assert edge_rejects >= len(with_reply) - 3 + len(dropped) - 2, "edge rejections logged"
    assert_still_serving(t, before)


def test_out_of_range_numbers_get_a_clear_error(target: Target) -> None:
    """Integers the database cannot hold are valid JSON Schema ``count``s."""
    t = target
    before = db_snapshot(t.grid.store)
    expected = {"huge-cpus": "invalid", "huge-mem": "invalid"}
    t.attacker.publish_bytes(t.coord_topic, doc("workers.list", t.attacker_inbox,
                                                mid="huge-cpus", min_cpus=10**30))
    t.attacker.publish_bytes(t.coord_topic, doc("workers.list", t.attacker_inbox,
                                                mid="huge-mem", min_memory_bytes=2**64))
    wait_for(lambda: set(expected) <= set(t.attacker_replies.by_re), 10, message="replies")
    assert_still_serving(t, before)
    got = {mid: t.attacker_replies.by_re[mid].code for mid in expected}
    assert got == expected, [t.attacker_replies.by_re[m].message for m in expected]


def test_oversized_payloads(target: Target) -> None:
    """4 MiB + 1: the broker may cut the connection (amqtt) or pass it on (Mosquitto,
    whose own limit is higher); either way the coordinator drops it and survives."""
    t = target
    grid = t.grid
    before = db_snapshot(grid.store)
    pad = "x" * (DEFAULT_MAX_PAYLOAD + 1)
    big = doc("workers.list", t.attacker_inbox, mid="big", name=pad)
    assert len(big) > DEFAULT_MAX_PAYLOAD
    # Separate connections: an amqtt disconnect must not take the others with it. The
    # Bus refuses to send over-limit messages, so these go straight through paho.
    flooder = grid.bus(ATTACKER, "client")
    flooder._client.publish(t.coord_topic, big, qos=0)
    good2 = grid.bus("w-good", "worker", client_id="w-good-big")
    good2._client.publish(grid.topics.worker_heartbeat("w-good"), big.replace(
        b'"workers.list"', b'"worker.heartbeat"'), qos=0)
    good2._client.publish(grid.topics.worker_caps("w-good"), big.replace(
        b'"workers.list"', b'"worker.caps"'), qos=0)
    if grid.broker_kind == "mosquitto":  # delivered: the bus refuses it unread
        wait_for(lambda: t.logged("too_large") >= 3, 15, message="too_large logged x3")
    t.barrier(lambda p: t.attacker.publish_bytes(t.coord_topic, p))
    t.barrier(lambda p: t.good.raw("caps", p))
    t.barrier(lambda p: t.good.raw("heartbeat", p))
    assert "big" not in t.attacker_replies.by_re  # too large to read a reply_to from
    assert_still_serving(t, before)


# ----------------------------------------------------------------------- presence topics


def test_garbage_on_a_workers_presence_topics(target: Target) -> None:
    t = target
    grid = t.grid
    before = db_snapshot(grid.store)
    inbox = grid.topics.worker_inbox("w-good")  # the worker's own inbox takes the errors
    expected: dict[str, str] = {}
    rng = random.Random(99)

    def answered(want: str, mtype: str, **fields: Any) -> bytes:
        mid = f"{want}-{len(expected)}"
        expected[mid] = want
        return doc(mtype, inbox, mid=mid, **fields)

    caps = minimal_caps("w-good").to_dict()
    beat: dict[str, Any] = {"wid": "w-good", "seq": 5, "interval_s": 1.0, "cpu_percent": 1.0,
            "mem_used_bytes": 1, "free_slots": 1}
    noise = [b"{oops", b"[]", b"42", b"", bytes(rng.getrandbits(8) for _ in range(512)),
             b"[" * 100_000]
    per_topic: dict[str, list[bytes]] = {
        "caps": [
            *noise,
            answered("invalid", "worker.caps", **{**caps, "slots": "x"}),
            answered("invalid", "worker.caps", **{k: v for k, v in caps.items()
                                                  if k != "host"}),
            answered("invalid", "worker.caps", **caps, evil=1),
            answered("invalid", "worker.caps", **{**caps, "tags": ["t" * 65]}),
            answered("invalid", "worker.caps", **{**caps, "wid": "a/b"}),
            answered("unsupported_version", "worker.caps", v=2, **caps),
            answered("unknown_type", "worker.capabilities", **caps),
            # valid, but naming another worker than the topic: dropped by the registry
            doc("worker.caps", None, **{**caps, "wid": "w-other", "tags": ["forged"]}),
        ],
        "status": [
            *noise,
            answered("invalid", "worker.status", wid="w-good", state="lost", clean=False),
            answered("invalid", "worker.status", wid="w-good", state="offline"),
            answered("invalid", "worker.status", wid="w-good", state="offline", clean="no"),
            answered("bad_envelope", "worker.status", v=0, wid="w-good",
                     state="offline", clean=True),
            answered("unsupported_version", "worker.status", v=3, wid="w-good",
                     state="offline", clean=True),
            doc("worker.status", None, wid="w-other", state="offline", clean=True),
            doc("worker.status", None, wid="w-other", state="draining", clean=True),
        ],
        "heartbeat": [
            *noise,
            answered("invalid", "worker.heartbeat", **{**beat, "cpu_percent": -1}),
            answered("invalid", "worker.heartbeat", **{k: v for k, v in beat.items()
                                                       if k != "seq"}),
            answered("invalid", "worker.heartbeat", **{**beat, "running": "everything"}),
            answered("invalid", "worker.heartbeat", **{**beat, "interval_s": 0}),
            doc("worker.heartbeat", None, **{**beat, "wid": "w-other"}),
        ],
    }
    for kind, payloads in per_topic.items():
        for payload in payloads:
            t.good.raw(kind, payload)
    for kind in per_topic:
        t.barrier(functools.partial(t.good.raw, kind))
    wait_for(lambda: t.logged("naming worker 'w-other'") >= 3, 5,
             message="forged caps/status logged")
    check_replies(t.worker_replies, expected)
    assert_still_serving(t, before)
    other = grid.worker_record("w-other")
    assert other is not None
    assert other.state.value == "online"
    assert other.tags == ["other"]


def test_wrong_message_type_on_a_presence_topic_changes_nothing(target: Target) -> None:
    t = target
    grid = t.grid
    before = db_snapshot(grid.store)
    beat = WorkerHeartbeat(wid="w-good", seq=1, interval_s=600.0, cpu_percent=1.0,
                           mem_used_bytes=1, free_slots=1)
    status = WorkerStatus(wid="w-good", state="online", clean=True)
    event = WorkerEvent(wid="w-good", new_state="online")
    for kind, body in (("caps", beat), ("caps", status), ("caps", event),
                       ("status", minimal_caps("w-good")), ("status", beat),
                       ("heartbeat", status), ("heartbeat", minimal_caps("w-good"))):
        t.good.bus.publish(f"{grid.topics.root}/worker/w-good/{kind}", body)
    for kind in ("caps", "status", "heartbeat"):
        t.barrier(functools.partial(t.good.raw, kind))
    record = grid.worker_record("w-good")
    assert record is not None
    assert record.tags == ["good"]
    assert record.cpus == 4
    assert db_snapshot(grid.store) == before


def test_noise_on_every_topic_the_coordinator_subscribes_to(target: Target) -> None:
    """Whatever the coordinator subscribes to (today and after later features), noise
    published there by a principal allowed to publish is dropped without harm."""
    t = target
    grid = t.grid
    before = db_snapshot(grid.store)
    filters = sorted(t.coordinator.bus.topic_filters())
    assert filters, "the coordinator subscribes to something"
    root = grid.topics.root
    covered = []
    for topic_filter in filters:
        if topic_filter.startswith(f"{root}/worker/+/"):
            publisher, topic = t.good.bus, topic_filter.replace("+", "w-good")
        elif topic_filter == f"{root}/coord/inbox/+":
            publisher, topic = t.attacker, topic_filter.replace("+", ATTACKER)
        else:
            continue  # nobody but the coordinator may publish there
        if "+" in topic or "#" in topic:
            continue
        covered.append(topic_filter)
        for payload in (b"\x00\x01garbage", b"[]", b"{}", b'{"type":1}', b"1e999",
                        doc("ping", "not/an/inbox", v=7), doc("worker.status", None)):
            publisher.publish_bytes(topic, payload)
        t.barrier(functools.partial(publisher.publish_bytes, topic))
    assert f"{root}/coord/inbox/+" in covered
    assert f"{root}/worker/+/caps" in covered
    assert_still_serving(t, before)
