"""The bus against both brokers: request/reply, lanes, the edge, identity, reconnection.

Every test runs on the embedded amqtt broker and on a real Mosquitto (``broker_kind``),
with real principals and the real ACL (no anonymous access). Waiting is on observed
messages or ``threading.Event``, never on sleeps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from broker.bus import Bus, BusError, Incoming, Lane, RemoteError, RequestTimeout
from broker.config import BusConfig
from schemas.codec import envelope
from schemas.messages import (
    Error,
    Ping,
    Pong,
    WorkersList,
    WorkersShow,
    WorkersShowReply,
)
from tests.fixtures.backends import BrokerHandle
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import free_port, wait_for

pytestmark = [pytest.mark.integration]

SERVICE = "svc"  # a coordinator-role principal: the only one that owns coord/inbox
CLIENT = "alice"


def service(grid: GridHarness, handlers: dict[str, Callable[[Incoming], None]],
            lanes: dict[str, Lane] | None = None) -> Bus:
    """A bus owning the coordinator inbox with the given request handlers."""
    bus = grid.bus(SERVICE, "coordinator", inbox=grid.topics.coord_inbox, start=False)
    for mtype, handler in handlers.items():
        bus.on_inbox(mtype, handler, lane=(lanes or {}).get(mtype, Lane.DEFAULT))
    bus.start(timeout=5)
    return bus


def client(grid: GridHarness, principal: str = CLIENT) -> Bus:
    return grid.bus(principal, "client", inbox=grid.topics.client_inbox(principal))


class Errors:
    """Collects ``error`` messages arriving in a bus's inbox (replies to raw requests)."""

    def __init__(self, bus: Bus) -> None:
        self.by_re: dict[str, Error] = {}
        self.all: list[Incoming] = []
        self._lock = threading.Lock()
        bus.on_inbox("error", self._record)

    def _record(self, incoming: Incoming) -> None:
        with self._lock:
            self.all.append(incoming)
            if incoming.message.re:
                self.by_re[incoming.message.re] = incoming.body


def raw(mtype: str, mid: str, reply_to: str | None, **fields: Any) -> bytes:
    doc: dict[str, Any] = {"type": mtype, "v": 1, "id": mid, "ts": time.time(), **fields}
    if reply_to is not None:
        doc["reply_to"] = reply_to
    return json.dumps(doc).encode()


# ----------------------------------------------------------------------- request / reply


def test_request_reply_round_trip_with_sender_from_topic(grid: GridHarness) -> None:
    seen: list[Incoming] = []

    def on_ping(incoming: Incoming) -> None:
        seen.append(incoming)
        svc.reply(incoming, Pong(component="svc", principal=incoming.sender))

    def on_show(incoming: Incoming) -> None:
        svc.reply(incoming, WorkersShowReply(worker={
            "id": incoming.body.worker, "name": incoming.body.worker, "state": "online"}))

    svc = service(grid, {"ping": on_ping, "workers.show": on_show})
    alice = client(grid)

    reply = alice.request(grid.topics.coord_inbox, Ping(), timeout=5)
    assert isinstance(reply.body, Pong)
    assert reply.body.principal == CLIENT, "the handler saw the sender named by the topic"
    assert reply.re is not None
    incoming = seen[0]
    assert incoming.sender == CLIENT
    assert incoming.topic == f"{grid.topics.coord_inbox}/{CLIENT}"
    assert incoming.message.reply_to == grid.topics.client_inbox(CLIENT)
    assert incoming.message.id == reply.re

    # Many requests in flight at once: each reply completes its own request.
    futures = {str(i): alice.request_async(grid.topics.coord_inbox, WorkersShow(worker=str(i)))
               for i in range(50)}
    for key, future in futures.items():
        assert future.result(5).body.worker["id"] == key


def test_request_timeout_raises_a_clear_error(grid: GridHarness) -> None:
    alice = client(grid)
    ghost = grid.topics.worker_inbox("ghost")
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        alice.request(ghost, Ping(), timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 3
    text = str(info.value)
    assert "no reply to ping" in text
    assert ghost in text
    assert "0.3s" in text
    assert isinstance(info.value, BusError)


def test_a_handler_may_make_nested_requests(grid: GridHarness) -> None:
    """client -> service handler -> worker (and -> itself on another lane) -> replies."""
    worker = grid.bus("w1", "worker", inbox=grid.topics.worker_inbox("w1"))
    worker.on_inbox("ping", lambda inc: worker.reply(
        inc, Pong(component="worker", principal="w1")))

    def on_show(incoming: Incoming) -> None:
        # Both requests block this handler's lane until their replies arrive.
        from_worker = svc.request(grid.topics.worker_inbox("w1"), Ping(), timeout=5)
        from_self = svc.request(grid.topics.coord_inbox, Ping(), timeout=5)
        svc.reply(incoming, WorkersShowReply(worker={
            "id": "w1", "name": from_worker.body.principal,
            "state": "online", "description": from_self.body.component}))

    def on_ping(incoming: Incoming) -> None:
        svc.reply(incoming, Pong(component="self", principal=incoming.sender))

    svc = service(grid, {"workers.show": on_show, "ping": on_ping},
                  lanes={"workers.show": Lane.REQUESTS, "ping": Lane.ADMIN})
    alice = client(grid)
    reply = alice.request(grid.topics.coord_inbox, WorkersShow(worker="w1"), timeout=10)
    assert reply.body.worker == {"id": "w1", "name": "w1", "state": "online",
                                 "description": "self"}


def test_lanes_keep_order_and_do_not_block_each_other(grid: GridHarness) -> None:
    n = 100
    release = threading.Event()
    slow: list[str] = []
    fast: list[str] = []

    def on_show(incoming: Incoming) -> None:
        if not slow:
            release.wait(10)  # lane "a" is stuck here while lane "b" keeps going
        slow.append(incoming.body.worker)

    def on_list(incoming: Incoming) -> None:
        fast.append(incoming.body.name)

    service(grid, {"workers.show": on_show, "workers.list": on_list},
            lanes={"workers.show": Lane.REQUESTS, "workers.list": Lane.ADMIN})
    alice = client(grid)
    for i in range(n):
        alice.send(grid.topics.coord_inbox, WorkersShow(worker=str(i)))
        alice.send(grid.topics.coord_inbox, WorkersList(name=str(i)))
    wait_for(lambda: len(fast) == n, 10, message=f"lane b got {len(fast)}/{n}")
    assert slow == [], "lane a is still held by its first message"
    release.set()
    wait_for(lambda: len(slow) == n, 10, message=f"lane a got {len(slow)}/{n}")
    assert fast == [str(i) for i in range(n)]
    assert slow == [str(i) for i in range(n)]


# ----------------------------------------------------------------------- the edge


def test_invalid_requests_get_error_replies_and_never_reach_handlers(grid: GridHarness) -> None:
    calls: list[Incoming] = []
    svc = service(grid, {"workers.list": calls.append, "workers.show": calls.append,
                         "ping": lambda inc: svc.reply(inc, Pong(component="svc"))})
    alice = client(grid)
    errors = Errors(alice)
    inbox = grid.topics.client_inbox(CLIENT)
    topic = f"{grid.topics.coord_inbox}/{CLIENT}"
    cases = {
        "wrong-type": (raw("workers.list", "wrong-type", inbox, min_cpus="x"), "invalid"),
        "extra-field": (raw("workers.list", "extra-field", inbox, evil=1), "invalid"),
        "missing-field": (raw("workers.show", "missing-field", inbox), "invalid"),
        "unknown-type": (raw("frobnicate", "unknown-type", inbox), "unknown_type"),
        "bad-version": (json.dumps({"type": "workers.list", "v": 2, "id": "bad-version",
                                    "ts": 1.0, "reply_to": inbox}).encode(),
                        "unsupported_version"),
        "no-ts": (json.dumps({"type": "workers.list", "v": 1, "id": "no-ts",
                              "reply_to": inbox}).encode(), "bad_envelope"),
        "unhandled": (raw("pong", "unhandled", inbox, component="x"), "unsupported"),
    }
    for payload, _ in cases.values():
        alice.publish_bytes(topic, payload)
    # No reply_to, or an unusable one: dropped and logged, never answered.
    alice.publish_bytes(topic, b"{not json")
    alice.publish_bytes(topic, raw("workers.list", "no-reply", None, min_cpus="x"))
    alice.publish_bytes(topic, raw("workers.list", "not-inbox", "elsewhere/x", min_cpus="x"))
    wait_for(lambda: len(errors.by_re) >= len(cases), 10,
             message=f"error replies: {sorted(errors.by_re)}")
    for mid, (_, code) in cases.items():
        assert errors.by_re[mid].code == code, (mid, errors.by_re[mid])
        assert errors.by_re[mid].message
    # A valid request after the garbage still works; no handler ever saw garbage.
    assert isinstance(alice.request(grid.topics.coord_inbox, Ping(), timeout=5).body, Pong)
    assert calls == []
    assert set(errors.by_re) == set(cases)
    assert all(inc.sender == SERVICE for inc in errors.all)


def test_remote_error_carries_the_code(grid: GridHarness) -> None:
    svc = service(grid, {"workers.show": lambda inc: svc.reply_error(
        inc, "not_found", f"no worker {inc.body.worker!r}")})
    alice = client(grid)
    with pytest.raises(RemoteError) as info:
        alice.request(grid.topics.coord_inbox, WorkersShow(worker="nope"), timeout=5)
    assert info.value.code == "not_found"
    assert "nope" in str(info.value)
    assert info.value.request_type == "workers.show"


# ----------------------------------------------------------------------- identity


def test_the_sender_slot_cannot_be_spoofed(grid: GridHarness) -> None:
    grid.token("bob", "client")
    seen: list[Incoming] = []
    got_last = threading.Event()

    def on_list(incoming: Incoming) -> None:
        seen.append(incoming)
        if incoming.body.name == "last":
            got_last.set()

    service(grid, {"workers.list": on_list})
    alice = client(grid)
    # alice writes into bob's slot of the coordinator inbox: the broker drops it.
    forged = raw("workers.list", "forged", None, name="forged")
    alice.publish_bytes(f"{grid.topics.coord_inbox}/bob", forged).wait_for_publish(5)
    alice.send(grid.topics.coord_inbox, WorkersList(name="last"))
    assert got_last.wait(10)
    assert [(inc.sender, inc.body.name) for inc in seen] == [(CLIENT, "last")]


class Inbox:
    """Every message of the given types arriving in a bus's inbox that no pending request
    of its own consumed: what others sent it unasked."""

    def __init__(self, bus: Bus, *types: str) -> None:
        self.got: list[Incoming] = []
        self._lock = threading.Lock()
        for mtype in types:
            bus.on_inbox(mtype, self._record)

    def _record(self, incoming: Incoming) -> None:
        with self._lock:
            self.got.append(incoming)

    def of(self, mid: str) -> list[Incoming]:
        with self._lock:
            return [inc for inc in self.got if inc.message.re == mid]


def test_replies_go_only_to_the_senders_own_inbox(grid: GridHarness) -> None:
    """Issue 8, item 11: ``reply_to`` cannot aim a reply at another principal's inbox.

    mallory asks with alice's inbox as reply_to: the answer (a result, or an error for an
    invalid request) comes to mallory's own inbox, and alice hears nothing. A reply_to
    naming the coordinator's inbox is not answered at all by the coordinator's own bus.
    """
    grid.token("mallory", "client")
    svc = service(grid, {"ping": lambda inc: svc.reply(inc, Pong(component="svc",
                                                                 principal=inc.sender))})
    alice = client(grid)
    mallory = client(grid, "mallory")
    heard_by_alice = Inbox(alice, "pong", "error")
    heard_by_mallory = Inbox(mallory, "pong", "error")
    victim = grid.topics.client_inbox(CLIENT)
    asks = {
        "as-alice": envelope(Ping(), reply_to=victim),
        "as-worker": envelope(Ping(), reply_to=grid.topics.worker_inbox(CLIENT)),
        "as-coordinator": envelope(Ping(), reply_to=grid.topics.coord_inbox),
    }
    for env in asks.values():
        mallory.send(grid.topics.coord_inbox, env)
    invalid = raw("workers.list", "invalid-as-alice", victim, min_cpus="x")
    mallory.publish_bytes(f"{grid.topics.coord_inbox}/mallory", invalid)

    wait_for(lambda: heard_by_mallory.of(asks["as-alice"].id)
             and heard_by_mallory.of("invalid-as-alice"), 10, message="answers to mallory")
    answer = heard_by_mallory.of(asks["as-alice"].id)[0]
    assert answer.topic == f"{grid.topics.client_inbox('mallory')}/{SERVICE}"
    assert answer.body.principal == "mallory"
    assert heard_by_mallory.of("invalid-as-alice")[0].body.code == "invalid"
    # A marker from the service to alice, sent after mallory's asks were answered, comes
    # in order behind anything the service might have aimed at her.
    svc.send(victim, envelope(Pong(component="marker"), re="marker"))
    wait_for(lambda: heard_by_alice.of("marker"), 10, message="marker reached alice")
    assert [inc.message.re for inc in heard_by_alice.got] == ["marker"], (
        "a reply was redirected into alice's inbox")
    # A worker-kind reply_to is answered in mallory's worker-kind inbox, which nobody
    # reads (she is no worker); the coordinator's inbox gets nothing.
    assert heard_by_mallory.of(asks["as-worker"].id) == []
    assert heard_by_mallory.of(asks["as-coordinator"].id) == []


def test_a_worker_answers_requests_from_the_coordinator_in_its_inbox(
        grid: GridHarness) -> None:
    """The one case where the reply goes to another inbox than the sender's name: the
    coordinator's own inbox, for the coordinator principal a worker was told about."""
    topics = grid.topics
    worker = grid.bus("w1", "worker", inbox=topics.worker_inbox("w1"), start=False)
    worker.coordinator = SERVICE
    worker.on_inbox("ping", lambda inc: worker.reply(inc, Pong(component="w1")))
    worker.start(timeout=5)
    svc = service(grid, {})
    assert isinstance(svc.request(topics.worker_inbox("w1"), Ping(), timeout=5).body, Pong)
    # A client naming the coordinator's inbox as reply_to gets no answer from the worker.
    alice = client(grid)
    sneaky = envelope(Ping(), reply_to=topics.coord_inbox)
    seen = Inbox(svc, "pong")
    alice.send(topics.worker_inbox("w1"), sneaky)
    assert isinstance(alice.request(topics.worker_inbox("w1"), Ping(), timeout=5).body, Pong)
    worker.send(topics.coord_inbox, envelope(Pong(component="marker"), re="marker"))
    wait_for(lambda: seen.of("marker"), 10, message="marker reached the coordinator inbox")
    assert seen.of(sneaky.id) == []


def test_wrong_credentials_are_refused_naming_the_principal(grid: GridHarness) -> None:
    grid.token(CLIENT, "client")
    cfg = BusConfig(url=grid.url, principal=CLIENT, token="not-the-token", root=grid.root)
    with pytest.raises(BusError) as info:
        Bus(cfg).start(timeout=5)
    assert CLIENT in str(info.value)
    assert "refused" in str(info.value)

    cfg = BusConfig(url=grid.url, principal="nobody", token="whatever", root=grid.root)
    with pytest.raises(BusError, match="refused principal nobody"):
        Bus(cfg).start(timeout=5)


def test_anonymous_is_refused(grid: GridHarness) -> None:
    cfg = BusConfig(url=grid.url, root=grid.root)
    with pytest.raises(BusError, match=r"refused principal \(anonymous\)"):
        Bus(cfg).start(timeout=5)


def test_unreachable_broker_is_a_clear_error(grid: GridHarness) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    cfg = BusConfig(url=url, principal=CLIENT, token="x", root=grid.root)
    with pytest.raises(BusError, match="no MQTT broker answered") as info:
        Bus(cfg).start(timeout=1)
    assert url in str(info.value)


# ----------------------------------------------------------------------- reconnection


def test_bus_reconnects_and_resubscribes_after_a_broker_restart(
    grid: GridHarness, grid_broker: BrokerHandle, measurements: Callable[[str, float], None],
) -> None:
    hooks = {"svc": 0, "alice": 0}
    svc = service(grid, {"ping": lambda inc: svc.reply(inc, Pong(component="svc"))})
    alice = client(grid)
    def counter(name: str) -> Callable[[], None]:
        def count() -> None:
            hooks[name] += 1
        return count

    svc.on_connected(counter("svc"))
    alice.on_connected(counter("alice"))
    assert isinstance(alice.request(grid.topics.coord_inbox, Ping(), timeout=5).body, Pong)
    port = grid_broker.port

    grid_broker.kill()
    wait_for(lambda: not svc.connected.is_set() and not alice.connected.is_set(), 10,
             message="clients noticed the broker died")
    restarted = time.monotonic()
    grid_broker.start()
    assert grid_broker.port == port
    wait_for(lambda: svc.connected.is_set() and alice.connected.is_set(), 15,
             message="clients reconnected by themselves")
    measurements("reconnect_after_restart", time.monotonic() - restarted)
    assert svc.reconnects >= 1
    assert alice.reconnects >= 1
    # Both inboxes were subscribed again: a round trip works without any help.
    reply = alice.request(grid.topics.coord_inbox, Ping(), timeout=5)
    assert isinstance(reply.body, Pong)
    wait_for(lambda: hooks["svc"] >= 1 and hooks["alice"] >= 1, 5,
             message=f"on_connected hooks ran again: {hooks}")


def test_a_nested_json_bomb_in_the_inbox_does_not_kill_the_bus(grid: GridHarness) -> None:
    """Deeply nested JSON makes json.loads raise RecursionError, not ValueError.

    With a request pending, the bus decodes inbox messages that mention "re" on paho's
    network thread: an exception there must not stop that thread (invariants 3 and 5).
    Anyone who may write into a component's inbox could otherwise deafen it for good.
    """
    release = threading.Event()

    def on_show(incoming: Incoming) -> None:
        release.wait(10)
        svc.reply(incoming, WorkersShowReply(worker={"id": "x", "name": "x", "state": "online"}))

    svc = service(grid, {"workers.show": on_show,
                         "ping": lambda inc: svc.reply(inc, Pong(component="svc"))})
    alice = client(grid)
    pending = alice.request_async(grid.topics.coord_inbox, WorkersShow(worker="x"))
    bomb = b'{"re":"x","type":"error","v":1,"id":"b","ts":1,"x":' + b"[" * 200_000
    svc.publish_bytes(f"{grid.topics.client_inbox(CLIENT)}/{SERVICE}", bomb)
    release.set()
    assert pending.result(3).body.worker["id"] == "x"
    assert isinstance(alice.request(grid.topics.coord_inbox, Ping(), timeout=3).body, Pong)


def test_principals_added_later_can_connect_and_others_stay_connected(
    grid: GridHarness,
) -> None:
    """The harness adds principals on the fly (Mosquitto: new files + SIGHUP)."""
    svc = service(grid, {"ping": lambda inc: svc.reply(inc, Pong(component="svc",
                                                                 principal=inc.sender))})
    alice = client(grid)
    late = client(grid, "late-comer")  # created after everyone else was connected
    assert alice.request(grid.topics.coord_inbox, Ping(), timeout=5).body.principal == CLIENT
    assert late.request(grid.topics.coord_inbox, Ping(), timeout=5).body.principal == (
        "late-comer")
    assert svc.reconnects == 0, "a reload kicked nobody out"
    assert alice.reconnects == 0, "a reload kicked nobody out"


def test_a_misspelt_lane_fails_instead_of_starting_a_thread() -> None:
    """Lanes are an enum: a typo must not silently start a thread of its own."""
    bus = Bus(BusConfig(url="mqtt://127.0.0.1:1", principal="p"), inbox="xcloud/client/p/inbox")
    threads = threading.active_count()
    with pytest.raises(ValueError, match="typo"):
        bus.on_inbox("ping", lambda _incoming: None, lane="typo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="typo"):
        bus.subscribe("xcloud/x", lambda _incoming: None, lane="typo")  # type: ignore[arg-type]
    assert threading.active_count() == threads


def test_stop_survives_paho_ending_its_thread_during_loop_stop(
        grid: GridHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """paho's network thread may end on its own after disconnect() and clear its ``_thread``
    between loop_stop's check and its join (AttributeError on None.join, seen in CI during a
    coordinator's stop): the bus still stops, lanes and pending requests included."""
    alice = client(grid)
    network = alice._client._thread
    assert network is not None

    def racing_loop_stop() -> Any:
        network.join(5)  # the thread ended by itself, as after disconnect()
        alice._client._thread = None
        raise AttributeError("'NoneType' object has no attribute 'join'")

    monkeypatch.setattr(alice._client, "loop_stop", racing_loop_stop)
    pending = alice.request_async(grid.topics.worker_inbox("ghost"), Ping())
    alice.stop()
    assert not network.is_alive()
    with pytest.raises(BusError, match="bus stopped"):
        pending.result(1)


def test_stop_after_a_cancelled_request_and_no_pending_leak(grid: GridHarness) -> None:
    """A caller may cancel a request it gave up on (the job runner does before re-sending a
    report): the bus forgets it at once, and stop() still stops (it raised
    InvalidStateError on the cancelled future and left its lanes running)."""
    alice = client(grid)
    ghost = grid.topics.worker_inbox("ghost")  # nobody answers
    cancelled = alice.request_async(ghost, Ping())
    assert cancelled.cancel()
    assert not alice._pending, "a cancelled request stays in the pending table"
    waiting = alice.request_async(ghost, Ping())
    alice.stop()
    assert cancelled.cancelled()
    with pytest.raises(BusError, match="bus stopped"):
        waiting.result(1)
    assert not [t for t in threading.enumerate()
                if t.name.startswith(f"bus-{alice.client_id}")], "lanes left running"


def test_a_message_dispatched_while_the_bus_stops_starts_no_lane_thread() -> None:
    """An inbox handler's lane starts with its first message. That message may still be
    on its way (the inbox lane drains its queue) when ``stop`` has taken its list of
    lanes: a thread started then was never told to end (a leaked ``bus-…-default``)."""
    bus = Bus(BusConfig(url="mqtt://127.0.0.1:1", principal="p"), inbox="xcloud/client/p/inbox")
    seen: list[object] = []
    bus.on_inbox("job.event", seen.append)  # Lane.DEFAULT, not started yet
    before = {t.ident for t in threading.enumerate()}
    bus.stop()
    late = SimpleNamespace(topic="xcloud/client/p/inbox/coordinator",
                           message=SimpleNamespace(type="job.event", re=None))
    bus._dispatch_inbox(late)  # type: ignore[arg-type]
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    assert started == []
    assert seen == []
