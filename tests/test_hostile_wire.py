"""A hostile principal on the wire (issue 8, items 1, 9 and 11), on both brokers.

The brokers here drop a client that publishes over the payload limit, as a production
broker does: the embedded amqtt broker always (``max_payload``), Mosquitto with
``max_packet_size`` (set below). That is what turned one oversized reply into a
coordinator knocked off the broker for good: dropped, reconnected, the same message sent
again from paho's queue, dropped again.

- Item 1: caps near 4 MiB are refused at the edge and never stored; the largest valid
  caps are stored and shown; a reply the bus cannot carry becomes ``error too_large``;
  an over-limit publish never reaches paho, so it is never re-sent.
- Item 9: a heartbeat listing a reservation id that ``reservation.close`` could not name
  is refused at the edge, not half-processed with a traceback.
- Item 11: a ``reply_to`` naming someone else's inbox gets its answer in the sender's
  own inbox, from the coordinator and from a worker alike.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Bus, Incoming, MessageTooLarge
from coordinator import wire
from coordinator.store import WorkerRecord
from coordinator.worker_state import WorkerState
from schemas.codec import DEFAULT_MAX_PAYLOAD, Envelope, envelope
from schemas.messages import MosquittoExportReply, Ping, Pong, WorkerCaps, WorkersList
from tests.fixtures.actors import minimal_caps, minimal_heartbeat
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import MosquittoProcess, wait_for
from tests.test_schema_shapes import largest, resolved_definition

pytestmark = [pytest.mark.integration]

# Mosquitto counts the whole packet (fixed header, topic, packet id); the bus and amqtt
# count the payload. This leaves room for any topic on top of a payload at the limit.
MOSQUITTO_MAX_PACKET = DEFAULT_MAX_PAYLOAD + 65_600
MALLORY = "mallory"
ALICE = "alice"


@pytest.fixture
def grid(broker_kind: str, db_kind: str, grid_db_url: str, tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[GridHarness]:
    """The usual grid, but its Mosquitto drops over-limit publishes like amqtt does."""
    factory = None
    if broker_kind == "mosquitto":
        base = request.getfixturevalue("mosquitto_factory")

        def factory(**kwargs: Any) -> MosquittoProcess:
            extra = kwargs.pop("extra_config", "")
            broker: MosquittoProcess = base(
                extra_config=f"{extra}\nmax_packet_size {MOSQUITTO_MAX_PACKET}", **kwargs)
            return broker

    harness = GridHarness(tmp_path, broker_kind, db_kind, grid_db_url, factory)
    try:
        yield harness
    finally:
        harness.close()


class Heard:
    """Messages of some types arriving unasked in a bus's inbox (no pending request of
    the bus consumed them), by the id they answer."""

    def __init__(self, bus: Bus, *types: str) -> None:
        self._got: list[Incoming] = []
        self._lock = threading.Lock()
        for mtype in types:
            bus.on_inbox(mtype, self._record)

    def _record(self, incoming: Incoming) -> None:
        with self._lock:
            self._got.append(incoming)

    def answers(self) -> dict[str, Incoming]:
        with self._lock:
            return {inc.message.re: inc for inc in self._got if inc.message.re}


def raw_publish(bus: Bus, topic: str, payload: bytes) -> None:
    """Publish past the Bus's own checks, as a hostile client would (straight via paho)."""
    bus._client.publish(topic, payload, qos=1)


# ----------------------------------------------------------------------- item 1


def test_caps_near_the_payload_limit_are_refused_and_never_stored(
        grid: GridHarness, caplog: pytest.LogCaptureFixture) -> None:
    """The attack as reported: a worker's caps just under 4 MiB, the bulk in extra
    properties and long strings of ``cpu``, ``host`` and ``docker``. Refused at the edge;
    the coordinator keeps what it had, stays connected and shows the worker."""
    caplog.set_level(logging.WARNING)
    coordinator = grid.start_coordinator()
    worker = grid.fake_worker("w-big")
    worker.join(tags=["before"])
    admin = grid.client()
    pad = "x" * (DEFAULT_MAX_PAYLOAD // 4)
    caps = minimal_caps("w-big", tags=["after"]).to_dict()
    caps["cpu"] = {**caps["cpu"], "model": pad, "flags": pad}
    caps["host"] = {**caps["host"], "kernel": pad}
    caps["docker"] = {"available": True, "images": [], "notes": pad[: len(pad) - 8192]}
    payload = json.dumps({"type": "worker.caps", "v": 1, "id": uuid.uuid4().hex,
                          "ts": time.time(), **caps}).encode()
    assert DEFAULT_MAX_PAYLOAD - 16384 < len(payload) < DEFAULT_MAX_PAYLOAD
    raw_publish(worker.bus, grid.topics.worker_caps("w-big"), payload)
    wait_for(lambda: any("worker/w-big/caps" in r.getMessage() and "invalid" in r.getMessage()
                         for r in caplog.records), 15, message="oversized caps refused")
    record = grid.worker_record("w-big")
    assert record is not None
    assert record.tags == ["before"], "the refused document was stored"
    assert len(json.dumps(record.caps)) < 4096
    shown = admin.worker("w-big")
    assert shown.caps["cpu"] == {"count": 4}
    assert coordinator.bus.reconnects == 0


def test_the_largest_valid_caps_are_stored_and_shown_whole(grid: GridHarness) -> None:
    """The bound leaves room: the largest document the schema allows (about 0.6 MiB) is
    stored, and ``workers.show`` returns it whole, with no disconnect anywhere."""
    coordinator = grid.start_coordinator()
    worker = grid.fake_worker("w-max")
    worker.join()
    caps = largest(resolved_definition("worker.caps", "caps"), "caps")
    caps["wid"] = "w-max"
    caps["name"] = "w-max"
    worker.bus.publish(grid.topics.worker_caps("w-max"), WorkerCaps.from_dict(caps),
                       retain=True)
    wait_for(lambda: (r := grid.worker_record("w-max")) and len(r.tags) == 64, 15,
             message="largest caps stored")
    shown = grid.client().worker("w-max")
    assert shown.caps == caps
    assert len(json.dumps(caps)) > 500_000
    assert coordinator.bus.reconnects == 0
    assert worker.bus.reconnects == 0


def test_a_reply_the_bus_cannot_carry_becomes_too_large(
        grid: GridHarness, caplog: pytest.LogCaptureFixture) -> None:
    """The replier measures what it would send: over ``bus.max_payload`` the requester gets
    ``error too_large`` (logged), never the message that would get the replier dropped."""
    caplog.set_level(logging.WARNING)
    service = grid.bus("svc", "coordinator", inbox=grid.topics.coord_inbox, start=False)

    def export(incoming: Incoming) -> None:
        size = int(incoming.body.name or "0")
        service.reply(incoming, MosquittoExportReply(root="r", principals=1, passwd="p" * size,
                                                     acl=""))

    service.on_inbox("workers.list", export)
    service.on_inbox("ping", lambda inc: service.reply(inc, Pong(component="svc")))
    service.start(timeout=5)
    alice = grid.bus(ALICE, "client", inbox=grid.topics.client_inbox(ALICE))
    from broker.bus import RemoteError

    with pytest.raises(RemoteError) as info:
        alice.request(grid.topics.coord_inbox, WorkersList(name=str(DEFAULT_MAX_PAYLOAD)),
                      timeout=10)
    assert info.value.code == "too_large"
    assert "one message" in str(info.value)
    assert any("too_large" in r.getMessage() for r in caplog.records)
    just_fits = DEFAULT_MAX_PAYLOAD - 1024
    reply = alice.request(grid.topics.coord_inbox, WorkersList(name=str(just_fits)),
                          timeout=10)
    assert len(reply.body.passwd) == just_fits
    assert isinstance(alice.request(grid.topics.coord_inbox, Ping(), timeout=5).body, Pong)
    assert service.reconnects == 0, "the replier was dropped by the broker"


def test_an_over_limit_publish_never_reaches_the_broker(grid: GridHarness) -> None:
    """Refused before paho: nothing sits in paho's queue to be sent again after every
    reconnect. The connection stays up and the next round trip works."""
    service = grid.bus("svc", "coordinator", inbox=grid.topics.coord_inbox, start=False)
    service.on_inbox("ping", lambda inc: service.reply(inc, Pong(component="svc")))
    service.start(timeout=5)
    alice = grid.bus(ALICE, "client", inbox=grid.topics.client_inbox(ALICE))
    payload = b" " * (DEFAULT_MAX_PAYLOAD + 1)
    with pytest.raises(MessageTooLarge) as info:
        alice.publish_bytes(f"{grid.topics.coord_inbox}/{ALICE}", payload)
    assert info.value.code == "too_large"
    assert info.value.size == DEFAULT_MAX_PAYLOAD + 1
    with pytest.raises(MessageTooLarge):
        alice.request(grid.topics.coord_inbox, MosquittoExportReply(
            root="r", principals=1, passwd="p" * DEFAULT_MAX_PAYLOAD, acl=""), timeout=5)
    assert isinstance(alice.request(grid.topics.coord_inbox, Ping(), timeout=5).body, Pong)
    assert alice.reconnects == 0
    assert alice.connected.is_set()


def test_workers_list_is_cut_to_fit_one_message() -> None:
    """A listing longer than one message can carry says so (``more``) instead of being
    refused whole."""
    now = time.time()
    records = [WorkerRecord(
        id=f"w{i:04d}", name=f"w{i:04d}", state=WorkerState.ONLINE, state_reason="",
        state_changed_at=now, description="d" * 1000, tags=["t"], caps={}, cpus=1,
        memory_bytes=1, os="linux", arch="x86_64", executors=["process"], slots=1,
        free_slots=1, heartbeat_interval=5.0, first_seen=now, last_seen=now,
        last_heartbeat_at=None, last_metrics={}, heartbeat_seq=0) for i in range(100)]
    rows, more = wire.workers_list(records, budget=50_000)
    assert more
    assert 40 <= len(rows) < 50
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert len(json.dumps(rows, separators=(",", ":"))) <= 50_000
    rows, more = wire.workers_list(records[:10], budget=50_000)
    assert not more
    assert len(rows) == 10


def test_a_stored_document_from_before_the_bounds_is_left_out_of_workers_show(
        grid: GridHarness) -> None:
    """A caps row written before the schema bounded it (an open ``cpu`` object) does not
    break ``workers.show``: the worker is shown, without the unbounded document."""
    grid.start_coordinator()
    worker = grid.fake_worker("w-old")
    worker.join()
    legacy = {**minimal_caps("w-old").to_dict(), "cpu": {"count": 4, "flags": "x" * 5000}}
    grid.store.upsert_worker_caps("w-old", legacy, time.time(), keep_state=True)
    shown = grid.client().worker("w-old")
    assert shown.id == "w-old"
    assert shown.caps == {}


# ----------------------------------------------------------------------- item 9


def test_a_heartbeat_naming_an_impossible_reservation_is_refused_at_the_edge(
        grid: GridHarness, caplog: pytest.LogCaptureFixture) -> None:
    """A heartbeat's running reservation ids have reservation.close's shape. One of 100
    characters used to pass the heartbeat schema, then fail as the coordinator built the
    close: a traceback, and the rest of the list skipped. Now the heartbeat is refused at
    the edge, and ids at the maximum length are closed like any other."""
    caplog.set_level(logging.WARNING)
    grid.start_coordinator()
    worker = grid.fake_worker("w-hb")
    worker.join()
    beat = minimal_heartbeat("w-hb", 1).to_dict()
    bad = {**beat, "running": [{"kind": "reservation", "id": "x" * 100},
                               {"kind": "reservation", "id": "r-after-the-long-one"}]}
    worker.raw("heartbeat", json.dumps({"type": "worker.heartbeat", "v": 1, "id": "hb-bad",
                                        "ts": time.time(), **bad}).encode(), qos=1)
    wait_for(lambda: any("worker/w-hb/heartbeat" in r.getMessage() and "invalid" in
                         r.getMessage() for r in caplog.records), 10,
             message="the heartbeat was refused at the edge")
    longest = "r" * 64
    worker.heartbeat(2, running=[{"kind": "reservation", "id": longest},
                                 {"kind": "reservation", "id": "r-stale"}])
    assert worker.wait_closed(longest).reason
    assert worker.wait_closed("r-stale").reason
    assert worker.closed("r-after-the-long-one") is None
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert failures == [], [r.getMessage() for r in failures]


# ----------------------------------------------------------------------- item 11


def test_a_reply_to_another_principals_inbox_reaches_only_the_sender(
        grid: GridHarness) -> None:
    """mallory asks the coordinator and a worker with alice's inbox as ``reply_to``: the
    answers come to mallory's own inbox and alice hears nothing. Legitimate requests
    between components keep working (alice's own, the coordinator asking the worker)."""
    grid.add_principals((MALLORY, "client"), (ALICE, "client"))
    grid.start_coordinator()
    grid.start_worker("w-real")
    mallory = grid.bus(MALLORY, "client", inbox=grid.topics.client_inbox(MALLORY),
                       start=False)
    alice = grid.bus(ALICE, "client", inbox=grid.topics.client_inbox(ALICE), start=False)
    to_mallory = Heard(mallory, "pong", "error", "workers.list.reply")
    to_alice = Heard(alice, "pong", "error", "workers.list.reply")
    mallory.start(timeout=5)
    alice.start(timeout=5)
    victim = grid.topics.client_inbox(ALICE)
    asks: list[tuple[str, Envelope[Any]]] = [
        (grid.topics.coord_inbox, envelope(Ping(), reply_to=victim)),
        (grid.topics.coord_inbox, envelope(WorkersList(), reply_to=victim)),
        (grid.topics.worker_inbox("w-real"), envelope(Ping(), reply_to=victim)),
    ]
    for base, env in asks:
        mallory.send(base, env)
    wait_for(lambda: {env.id for _, env in asks} <= set(to_mallory.answers()), 15,
             message="every answer reached mallory")
    for _, env in asks:
        answer = to_mallory.answers()[env.id]
        assert answer.topic.startswith(grid.topics.client_inbox(MALLORY) + "/")
    # alice asks both too, unpended (her answers take the same path as anything aimed at
    # her, in order behind it): once hers are in, nothing else came.
    own = [(base, envelope(Ping(), reply_to=victim)) for base, _ in asks[::2]]
    for base, env in own:
        alice.send(base, env)
    wait_for(lambda: {env.id for _, env in own} <= set(to_alice.answers()), 15,
             message="alice's own answers")
    assert set(to_alice.answers()) == {env.id for _, env in own}, (
        "a reply to mallory reached alice's inbox")
    # The coordinator still talks to the worker and answers about it.
    shown = grid.client().worker("w-real")
    assert shown.state == "online"
