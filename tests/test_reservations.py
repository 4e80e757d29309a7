"""Reservations and grants, coordinator side, over a real broker (docs/protocol.md).

Each test runs on the shared grid harness (tests/fixtures/grid.py): a broker of
``broker_kind`` (the embedded amqtt, or a real Mosquitto with the exported password file
and ACL, so authorization is real on both), a store in ``tmp_path`` (the race tests also
on MariaDB), a real ``Coordinator``, clients that are plain ``Bus`` objects
logged in as client/admin principals, and fake workers (tests/fixtures/actors.py): a
worker principal that publishes caps + status online and answers ``reservation.open`` as
the test wants (ok, an error, or not at all). The worker agent's own reservation code is
tested elsewhere; nothing here depends on it.

Every test that needs a broker runs on both (``broker_kind``): a broker authorizes by
principal and topic, so each exercise of the coordinator's logic is also one of the
traffic Mosquitto's ACL must let through. The race runs on amqtt with SQLite and on
Mosquitto with MariaDB. The store's unique index, the transition table and its diagram
need no broker at all.

Everything waits on observed messages or store state (``wait_for``), never on sleeps.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Incoming, Will
from coordinator.reservation_state import (
    TRANSITIONS,
    ReservationState,
    WorkerAlreadyReserved,
    check_transition,
    sources_of,
)
from coordinator.reservations import (
    REASON_CLIENT_GONE,
    REASON_EXPIRED,
    REASON_RESTARTED,
    REASON_WORKER_LOST,
    REASON_WORKER_OFFLINE,
)
from coordinator.service import Coordinator
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from schemas.codec import Envelope
from schemas.grants import public_key_from_text, verify_grant
from schemas.messages import (
    AuditList,
    AuditListReply,
    Body,
    ClientGone,
    ClientHello,
    CoordPubkey,
    Error,
    ExecReport,
    Ok,
    Release,
    Renew,
    ReservationEnded,
    ReservationsList,
    ReservationsListReply,
    Reserve,
    ReserveReply,
)
from schemas.topics import Topics
from tests.fixtures.actors import FakeWorker
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

REQUEST_TIMEOUT = 15.0
DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machines.md"
#: Coordinator settings of every test here, unless it says otherwise.
COORDINATOR_SETTINGS: dict[str, Any] = {"open_timeout_s": 2.0, "client_grace_s": 0.5}
#: The principals most tests use, created at once (one Mosquitto reload, not five).
CAST = (("w1", "worker"), ("w2", "worker"), ("alice", "client"), ("bob", "client"),
        ("root", "admin"))


# ----------------------------------------------------------------------------- actors


class Client:
    """A client principal on its own bus; records the reservation.ended it is sent."""

    def __init__(self, harness: GridHarness, cid: str, role: str = "client", *,
                 will: bool = False, **settings: Any) -> None:
        """``will``: the bus's last will is ``client.gone`` for its session, as the real
        client's is. ``settings`` override its ``BusConfig``."""
        self.cid = cid
        self.topics: Topics = harness.topics
        client_id = f"{cid}-{uuid.uuid4().hex[:8]}"
        last_will = (Will(self.topics.inbox_for(self.topics.coord_inbox, cid),
                          ClientGone(session=client_id), retain=False) if will else None)
        self.bus = harness.bus(cid, role, inbox=self.topics.client_inbox(cid),
                               client_id=client_id, will=last_will, start=False, **settings)
        self.session = client_id
        self.ended: list[ReservationEnded] = []
        self._lock = threading.Lock()
        self.bus.on_inbox("reservation.ended", self._on_ended)
        self.bus.start(timeout=10)

    def _on_ended(self, incoming: Incoming) -> None:
        with self._lock:
            self.ended.append(incoming.body)

    def ended_for(self, rid: str) -> ReservationEnded | None:
        with self._lock:
            return next((e for e in self.ended if e.reservation == rid), None)

    def wait_ended(self, rid: str, timeout: float = 10.0) -> ReservationEnded:
        found = wait_for(lambda: self.ended_for(rid), timeout,
                         message=f"{self.cid} told that {rid} ended")
        assert found is not None
        return found

    def ask(self, body: Body, timeout: float = REQUEST_TIMEOUT) -> Any:
        """The reply body (an ``Error`` is returned, not raised)."""
        reply: Envelope[Any] = self.bus.request(self.topics.coord_inbox, body,
                                                timeout=timeout, raise_errors=False)
        return reply.body

    def ask_async(self, body: Body) -> Future[Envelope[Any]]:
        return self.bus.request_async(self.topics.coord_inbox, body)

    def reserve(self, worker: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("session", self.session)
        return self.ask(Reserve(worker=worker, **kwargs))

    def reserved(self, worker: str | None = None, **kwargs: Any) -> ReserveReply:
        reply = self.reserve(worker, **kwargs)
        assert isinstance(reply, ReserveReply), reply
        return reply


class Scene:
    """A test's grid with its coordinator running, and the actors it creates."""

    def __init__(self, harness: GridHarness) -> None:
        self.harness = harness
        self.store: Store = harness.store
        self.topics = harness.topics

    @property
    def coord(self) -> Coordinator:
        assert self.harness.coordinator is not None
        return self.harness.coordinator

    @property
    def service(self) -> Any:
        return self.coord.reservations

    def start_coordinator(self) -> Coordinator:
        return self.harness.start_coordinator()

    def restart_coordinator(self) -> Coordinator:
        return self.harness.restart_coordinator()

    def client(self, cid: str, role: str = "client", **kwargs: Any) -> Client:
        return Client(self.harness, cid, role, **kwargs)

    def clients(self, *cids: str) -> list[Client]:
        """Several clients, their principals created at once (one Mosquitto reload)."""
        self.harness.add_principals(*((cid, "client") for cid in cids))
        return [self.client(cid) for cid in cids]

    def worker(self, wid: str, *, name: str | None = None, tags: list[str] | None = None,
               cpus: int = 4, executors: list[str] | None = None,
               images: list[str] | None = None) -> FakeWorker:
        """A fake worker, online: it answers reservation.open with ``Ok`` until told
        otherwise (``mode``)."""
        worker = self.harness.fake_worker(wid)
        worker.join(name=name or f"name-{wid}", tags=tags or ["linux"],
                    executors=executors or ["process"], cpu={"count": cpus},
                    host={"hostname": f"h-{wid}", "os": "linux", "arch": "x86_64"},
                    docker={"available": bool(images), "images": images or []},
                    heartbeat_s=3600.0)  # no liveness deadline during a test
        return worker

    def worker_state(self, wid: str) -> WorkerState | None:
        record = self.store.get_worker(wid)
        return record.state if record else None


GridFactory = Callable[..., Scene]


@pytest.fixture
def make_grid(grid: GridHarness) -> GridFactory:
    """``make_grid(**coordinator_settings)``: the test's grid, its coordinator started."""

    def make(**settings: Any) -> Scene:
        grid.add_principals(*CAST)
        grid.start_coordinator(**{**COORDINATOR_SETTINGS, **settings})
        return Scene(grid)

    return make


def error_of(reply: Any, code: str, *fragments: str) -> Error:
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply
    for fragment in fragments:
        assert fragment in reply.message, reply
    return reply


def live_reservations(grid: Scene) -> list[Any]:
    return grid.store.list_reservations(states=[ReservationState.OPENING,
                                                ReservationState.ACTIVE])


# ------------------------------------------------------------------------- reserving


def test_reserve_by_id_then_by_name(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1", name="alpha")
    alice = grid.client("alice")

    reply = alice.reserved("w1")
    res = reply.reservation
    assert (res["worker"], res["worker_name"], res["client"]) == ("w1", "alpha", "alice")
    assert res["state"] == "active"
    assert res["session"] == alice.session
    assert res["lease_s"] == 30.0
    assert res["executor"] == "process"
    assert len(w1.opens) == 1
    opened = w1.opens[0].reservation
    assert (opened["id"], opened["client"], opened["state"]) == (res["id"], "alice", "opening")
    assert grid.service.is_reserved("w1")

    assert isinstance(alice.ask(Release(reservation=res["id"])), Ok)
    assert not grid.service.is_reserved("w1")
    again = alice.reserved("alpha")  # by name
    assert again.reservation["worker"] == "w1"
    assert again.reservation["id"] != res["id"]


def test_reserve_any_matches_requirements(make_grid: GridFactory) -> None:
    grid = make_grid()
    grid.worker("small", tags=["linux"], cpus=2)
    grid.worker("big", tags=["linux", "gpu"], cpus=16, executors=["process", "docker"],
                images=["xcloud-busybox:latest"])
    alice, bob, carol = grid.client("alice"), grid.client("bob"), grid.client("carol")

    gpu = alice.reserved(any={"tags": ["gpu"], "min_cpus": 8})
    assert gpu.reservation["worker"] == "big"
    error_of(bob.reserve(any={"tags": ["gpu"]}), "not_found", "no worker", "tags=gpu")
    error_of(bob.reserve(any={"min_cpus": 64}), "not_found", "no worker", "min_cpus=64")
    assert alice.ask(Release(reservation=gpu.reservation["id"])) == Ok(
        detail={"reservation": gpu.reservation["id"]})

    docker = bob.reserved(any={"image": "xcloud-busybox:latest"}, image="xcloud-busybox:latest")
    assert docker.reservation["worker"] == "big"
    assert (docker.reservation["executor"], docker.reservation["image"]) == (
        "docker", "xcloud-busybox:latest")
    error_of(carol.reserve(any={"os": "windows"}), "not_found", "os=windows")
    # neither a worker nor requirements: any free worker
    anyone = carol.reserved()
    assert anyone.reservation["worker"] == "small"
    # a named worker is checked against requirements too
    grid.worker("other", tags=["linux"])
    dave = grid.client("dave")
    error_of(dave.reserve("other", any={"tags": ["gpu"]}), "conflict", "lacks tag(s) gpu")
    error_of(dave.reserve("other", image="img"), "conflict", "no docker executor")


def test_unknown_and_lost_workers_are_refused(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    error_of(alice.reserve("nope"), "not_found", "no worker with id or name 'nope'")
    w1.crash()
    wait_for(lambda: grid.worker_state("w1") == WorkerState.LOST, 10)
    error_of(alice.reserve("w1"), "conflict", "worker w1 is lost, not running")
    w1.status("online", clean=True)
    wait_for(lambda: grid.worker_state("w1") == WorkerState.ONLINE, 10)
    w1.status("draining", clean=True)
    wait_for(lambda: grid.worker_state("w1") == WorkerState.DRAINING, 10)
    error_of(alice.reserve("w1"), "conflict", "worker w1 is draining")
    assert not live_reservations(grid)


def test_already_reserved_and_per_principal_limit(make_grid: GridFactory) -> None:
    grid = make_grid(max_reservations_per_principal=1)
    grid.worker("w1")
    grid.worker("w2")
    alice, bob = grid.client("alice"), grid.client("bob")
    rid = alice.reserved("w1").reservation["id"]
    error_of(bob.reserve("w1"), "conflict", "worker w1 is already reserved")
    error_of(alice.reserve("w2"), "conflict",
             f"you already hold reservation {rid} on worker w1; release it first")
    assert bob.reserved("w2").reservation["worker"] == "w2"
    assert len(live_reservations(grid)) == 2


def test_limit_is_configurable(make_grid: GridFactory) -> None:
    grid = make_grid(max_reservations_per_principal=2)
    for wid in ("w1", "w2", "w3"):
        grid.worker(wid)
    alice = grid.client("alice")
    alice.reserved("w1")
    alice.reserved("w2")
    error_of(alice.reserve("w3"), "conflict", "you already hold 2 reservations")


@pytest.mark.parametrize(("broker_kind", "db_kind"), [
    ("amqtt", "sqlite"),
    pytest.param("mosquitto", "mariadb", marks=[pytest.mark.mosquitto, pytest.mark.mariadb]),
], indirect=True)
def test_ten_clients_race_for_one_worker(make_grid: GridFactory) -> None:
    grid = make_grid()
    worker = grid.worker("w1")
    clients = grid.clients(*(f"c{i}" for i in range(10)))
    futures: list[Future[Envelope[Any]]] = [
        c.ask_async(Reserve(worker="w1", session=c.session)) for c in clients
    ]
    replies = [f.result(REQUEST_TIMEOUT).body for f in futures]

    winners = [r for r in replies if isinstance(r, ReserveReply)]
    losers = [r for r in replies if not isinstance(r, ReserveReply)]
    assert len(winners) == 1, replies
    assert len(losers) == 9
    for loser in losers:
        error_of(loser, "conflict", "worker w1 is already reserved")
    live = live_reservations(grid)
    assert [r.id for r in live] == [winners[0].reservation["id"]]
    assert len(worker.opens) == 1


@BOTH_DBS
def test_store_admits_one_holder_under_concurrency(grid_db_url: str) -> None:
    """The unique index itself, without the coordinator or a broker: 16 threads insert
    at once."""
    with Store.open(grid_db_url) as store:
        store.upsert_worker_caps("w1", {"wid": "w1", "name": "w1", "tags": [], "slots": 1,
                                        "executors": ["process"], "host": {}, "cpu": {},
                                        "memory_bytes": 1}, 1.0)
        barrier = threading.Barrier(16)
        won: list[str] = []
        lost: list[BaseException] = []

        def attempt(i: int) -> None:
            barrier.wait()
            try:
                record = store.create_reservation(rid=f"r-{i}", worker_id="w1",
                                                  client_id=f"c{i}", lease_s=30, now=2.0)
                won.append(record.id)
            except BaseException as err:
                lost.append(err)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1, lost
        assert len(lost) == 15, lost
        assert all(isinstance(e, WorkerAlreadyReserved) for e in lost), lost
        ended = store.end_reservation(won[0], "done", 3.0)
        assert ended is not None
        assert ended[0] == ReservationState.OPENING
        assert store.end_reservation(won[0], "again", 4.0) is None
        # the worker is free again: the next reservation gets it
        assert store.create_reservation(rid="r-next", worker_id="w1", client_id="c1",
                                        lease_s=30, now=5.0).state == ReservationState.OPENING


def test_reserve_runs_off_the_request_lane(make_grid: GridFactory) -> None:
    """A reserve waiting on a silent worker does not hold up other requests."""
    grid = make_grid(open_timeout_s=3.0)
    slow = grid.worker("slow")
    slow.mode = "silent"
    grid.worker("fast")
    alice, bob = grid.client("alice"), grid.client("bob")
    pending = alice.ask_async(Reserve(worker="slow"))
    wait_for(lambda: slow.opens, 5, message="slow worker asked to open")
    assert bob.reserved("fast", ).reservation["worker"] == "fast"
    assert isinstance(bob.ask(ReservationsList()), ReservationsListReply)
    assert not pending.done()  # still waiting on the slow worker
    error_of(pending.result(REQUEST_TIMEOUT).body, "unavailable")


# ------------------------------------------------------------------------ open failures


def test_worker_not_answering_open(make_grid: GridFactory) -> None:
    grid = make_grid(open_timeout_s=1.0)
    w1 = grid.worker("w1")
    w1.mode = "silent"
    alice = grid.client("alice")
    error_of(alice.reserve("w1"), "unavailable", "worker w1 did not confirm the reservation "
             "within 1s")
    rid = w1.opens[0].reservation["id"]
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.state == ReservationState.ENDED
    assert "did not confirm" in record.ended_reason
    assert not grid.service.is_reserved("w1")
    w1.wait_closed(rid)
    assert alice.ended_for(rid) is None  # it never was active: the error reply says it all
    w1.mode = "ok"
    assert alice.reserved("w1").reservation["worker"] == "w1"


def test_worker_lost_while_opening(make_grid: GridFactory) -> None:
    grid = make_grid(open_timeout_s=1.5)
    w1 = grid.worker("w1")
    w1.mode = "silent"
    alice = grid.client("alice")
    pending = alice.ask_async(Reserve(worker="w1"))
    wait_for(lambda: w1.opens, 5, message="w1 asked to open")
    rid = w1.opens[0].reservation["id"]
    w1.crash()
    w1.wait_closed(rid)
    error_of(pending.result(REQUEST_TIMEOUT).body, "unavailable", REASON_WORKER_LOST)
    assert alice.ended_for(rid) is None


def test_worker_refusing_open(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    w1.mode = "error"
    reply = error_of(grid.client("alice").reserve("w1"), "unavailable",
                     "worker w1 refused the reservation: cannot prepare the work dir")
    assert reply.detail == {"worker_code": "conflict"}
    assert not live_reservations(grid)


# ------------------------------------------------------------------------- grants, renew


def test_grant_verifies_with_published_key(make_grid: GridFactory) -> None:
    grid = make_grid()
    grid.worker("w1")
    alice = grid.client("alice")
    keys: list[CoordPubkey] = []
    alice.bus.subscribe(grid.topics.coord_pubkey, lambda m: keys.append(m.body))
    wait_for(lambda: keys, 5, message="retained coord.pubkey")
    assert keys[0].alg == "ed25519"
    assert keys[0].key == grid.coord.grant_key.public_text
    key_file = grid.coord.config.data_dir / "grant_key.pem"
    assert key_file.exists()
    assert key_file.stat().st_mode & 0o777 == 0o600

    reply = alice.reserved("w1")
    claims = verify_grant(public_key_from_text(keys[0].key), reply.grant, client="alice",
                          worker="w1")
    assert claims.rid == reply.reservation["id"]
    assert claims.exp == reply.reservation["expires_at"]
    assert claims.kid == keys[0].kid


def test_renew_gives_a_fresh_grant_with_a_later_expiry(make_grid: GridFactory) -> None:
    grid = make_grid()
    grid.worker("w1")
    alice, bob = grid.client("alice"), grid.client("bob")
    first = alice.reserved("w1", lease_s=5)
    rid = first.reservation["id"]
    assert first.reservation["lease_s"] == 5

    renewed = alice.ask(Renew(reservation=rid))
    assert isinstance(renewed, ReserveReply)
    assert renewed.reservation["expires_at"] > first.reservation["expires_at"]
    assert renewed.grant != first.grant
    public = grid.coord.grant_key.public
    assert (verify_grant(public, renewed.grant, client="alice", worker="w1").exp
            > verify_grant(public, first.grant, client="alice", worker="w1").exp)
    assert grid.service._timers.deadline(("lease", rid)) == renewed.reservation["expires_at"]

    error_of(bob.ask(Renew(reservation=rid)), "forbidden", "belongs to alice")
    error_of(alice.ask(Renew(reservation="r-nope")), "not_found", "no reservation r-nope")
    alice.ask(Release(reservation=rid))
    error_of(alice.ask(Renew(reservation=rid)), "conflict", "has ended (released by alice)")


def test_lease_cut_to_maximum(make_grid: GridFactory) -> None:
    grid = make_grid(max_lease_s=60.0)
    grid.worker("w1")
    assert grid.client("alice").reserved("w1", lease_s=86400).reservation["lease_s"] == 60.0


# ------------------------------------------------------------------------------ ending


def test_release_by_holder_admin_and_stranger(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    w2 = grid.worker("w2")
    alice, bob = grid.client("alice"), grid.client("bob")
    admin = grid.client("root", role="admin")

    rid = alice.reserved("w1").reservation["id"]
    error_of(bob.ask(Release(reservation=rid)), "forbidden",
             f"reservation {rid} belongs to alice")
    assert isinstance(alice.ask(Release(reservation=rid, reason="done")), Ok)
    close = w1.wait_closed(rid)
    assert close.reason == "released by alice: done"
    error_of(alice.ask(Release(reservation=rid)), "conflict", "has ended")
    alice.ask(ReservationsList())  # a round trip: an ended message would have come first
    assert alice.ended_for(rid) is None  # the holder asked for it: no notice

    rid2 = bob.reserved("w2").reservation["id"]
    assert isinstance(admin.ask(Release(reservation=rid2)), Ok)
    ended = bob.wait_ended(rid2)
    assert (ended.worker, ended.reason) == ("w2", "released by root")
    w2.wait_closed(rid2)
    error_of(admin.ask(Release(reservation="r-nope")), "not_found")


def test_lease_expiry_ends_and_notifies(make_grid: GridFactory) -> None:
    grid = make_grid(default_lease_s=1.0)
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    reply = alice.reserved("w1")
    rid = reply.reservation["id"]
    assert reply.reservation["lease_s"] == 1.0
    ended = alice.wait_ended(rid)
    assert (ended.reason, ended.worker) == (REASON_EXPIRED, "w1")
    assert w1.wait_closed(rid).reason == REASON_EXPIRED
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.state == ReservationState.ENDED
    assert record.ended_at is not None
    assert record.ended_at >= reply.reservation["expires_at"]
    assert not grid.service.is_reserved("w1")
    error_of(alice.ask(Renew(reservation=rid)), "conflict", "lease expired")


def test_worker_lost_ends_reservation_and_holder_moves_on(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    grid.worker("w2")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    w1.crash()
    ended = alice.wait_ended(rid)
    assert (ended.reason, ended.worker) == (REASON_WORKER_LOST, "w1")
    w1.wait_closed(rid)
    assert alice.reserved("w2").reservation["worker"] == "w2"


def test_worker_going_offline_ends_reservation(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    w1.status("offline", clean=True)
    ended = alice.wait_ended(rid)
    assert ended.reason == REASON_WORKER_OFFLINE
    assert w1.wait_closed(rid).reason == REASON_WORKER_OFFLINE


def test_client_gone_ends_after_grace(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    # someone else cannot make alice's session disappear
    bob = grid.client("bob")
    bob.ask(ClientGone(session=alice.session))
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.client_gone_at is None

    assert isinstance(alice.ask(ClientGone(session=alice.session)), Ok)
    ended = alice.wait_ended(rid)
    assert ended.reason == REASON_CLIENT_GONE
    assert w1.wait_closed(rid).reason == REASON_CLIENT_GONE


def test_client_hello_within_grace_keeps_reservation(make_grid: GridFactory) -> None:
    grid = make_grid(client_grace_s=30.0)
    grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    key = ("gone", "alice", alice.session)
    alice.ask(ClientGone(session=alice.session))
    assert grid.service._timers.deadline(key) is not None
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.client_gone_at is not None
    assert isinstance(alice.ask(ClientHello(session=alice.session)), Ok)
    assert grid.service._timers.deadline(key) is None
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.client_gone_at is None
    assert record.live
    # a renewal also proves the holder alive
    alice.ask(ClientGone(session=alice.session))
    assert isinstance(alice.ask(Renew(reservation=rid)), ReserveReply)
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.client_gone_at is None


def test_client_last_will_ends_reservation(make_grid: GridFactory) -> None:
    """The real thing: the broker publishes client.gone when the connection dies."""
    grid = make_grid()
    grid.worker("w1")
    # No quick reconnect: the broker must see the connection gone, not taken over.
    carol = grid.client("carol", will=True, reconnect_min_s=30, reconnect_max_s=30)
    rid = carol.reserved("w1").reservation["id"]
    sock = carol.bus._client.socket()
    assert sock is not None
    sock.close()  # the connection dies without DISCONNECT: the broker sends the will
    wait_for(lambda: (r := grid.store.get_reservation(rid)) and r.state ==
             ReservationState.ENDED, 15, message="reservation ended by the last will")
    record = grid.store.get_reservation(rid)
    assert record is not None
    assert record.ended_reason == REASON_CLIENT_GONE


# ------------------------------------------------------------------------------ restart


def test_restart_keeps_active_reservation_and_lease(make_grid: GridFactory) -> None:
    grid = make_grid(default_lease_s=3.0)
    w1 = grid.worker("w1")
    w2 = grid.worker("w2")
    alice, bob = grid.client("alice"), grid.client("bob")
    long = alice.reserved("w1", lease_s=600).reservation
    short = bob.reserved("w2").reservation
    key = grid.coord.grant_key.public_text

    grid.restart_coordinator()
    assert grid.coord.grant_key.public_text == key  # grants stay verifiable
    assert grid.service._timers.deadline(("lease", long["id"])) == long["expires_at"]
    listed = alice.ask(ReservationsList(active=True))
    assert isinstance(listed, ReservationsListReply)
    assert [(r["id"], r["state"], r["expires_at"]) for r in listed.reservations] == [
        (long["id"], "active", long["expires_at"])]
    assert grid.service._timers.deadline(("lease", short["id"])) == short["expires_at"]
    # the rebuilt lease timer ends the short one, from the new coordinator
    ended = bob.wait_ended(short["id"])
    assert ended.reason == REASON_EXPIRED
    w2.wait_closed(short["id"])
    assert isinstance(alice.ask(Renew(reservation=long["id"])), ReserveReply)
    assert w1.closed(long["id"]) is None


def test_restart_ends_reservations_left_opening(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    grid.harness.stop_coordinator()
    grid.store.create_reservation(rid="r-crashed", worker_id="w1", client_id="alice",
                                  lease_s=30, now=1.0)
    grid.start_coordinator()
    record = grid.store.get_reservation("r-crashed")
    assert record is not None
    assert record.state == ReservationState.ENDED
    assert record.ended_reason == REASON_RESTARTED
    w1.wait_closed("r-crashed")
    assert grid.client("alice").reserved("w1").reservation["worker"] == "w1"


def test_restart_rebuilds_client_grace_timer(make_grid: GridFactory) -> None:
    grid = make_grid(client_grace_s=1.0)
    grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    alice.ask(ClientGone(session=alice.session))
    grid.restart_coordinator()
    assert grid.service._timers.deadline(("gone", "alice", alice.session)) is not None
    ended = alice.wait_ended(rid)
    assert ended.reason == REASON_CLIENT_GONE


# ---------------------------------------------------------------------- listing, audit


def test_reservations_list(make_grid: GridFactory) -> None:
    grid = make_grid()
    grid.worker("w1", name="alpha")
    grid.worker("w2")
    alice, bob = grid.client("alice"), grid.client("bob")
    admin = grid.client("root", role="admin")
    old = alice.reserved("w1").reservation["id"]
    alice.ask(Release(reservation=old))
    new = alice.reserved("w1").reservation["id"]
    theirs = bob.reserved("w2").reservation["id"]

    mine = alice.ask(ReservationsList())
    assert [r["id"] for r in mine.reservations] == [new, old]  # newest first
    assert mine.reservations[1]["state"] == "ended"
    assert mine.reservations[1]["ended_reason"] == "released by alice"
    assert mine.reservations[0]["worker_name"] == "alpha"
    active = alice.ask(ReservationsList(active=True))
    assert [r["id"] for r in active.reservations] == [new]
    error_of(alice.ask(ReservationsList(all=True)), "forbidden", "only admins")
    everyone = admin.ask(ReservationsList(all=True, active=True))
    assert {r["id"] for r in everyone.reservations} == {new, theirs}
    assert admin.ask(ReservationsList()).reservations == []


def test_exec_reports_make_the_audit_trail(make_grid: GridFactory) -> None:
    grid = make_grid()
    w1 = grid.worker("w1")
    w2 = grid.worker("w2")
    alice, bob = grid.client("alice"), grid.client("bob")
    admin = grid.client("root", role="admin")
    rid = alice.reserved("w1").reservation["id"]
    bob_rid = bob.reserved("w2").reservation["id"]

    report = ExecReport(reservation=rid, client="alice", exec_id="e1", command="echo hi",
                        started_at=1000.0, mode="output", exit_code=0, duration_s=0.01,
                        output_bytes=3, timed_out=False, truncated=False)
    assert isinstance(w1.report(report), Ok)
    assert isinstance(w1.report(report), Ok)  # a redelivery is stored once
    assert isinstance(w1.report(ExecReport(reservation=rid, client="alice", exec_id="e2",
                                           command="sleep 9", started_at=1001.0,
                                           signal=2, error="interrupted")), Ok)
    assert isinstance(w2.report(ExecReport(reservation=bob_rid, client="bob", exec_id="e1",
                                           command="ls", started_at=1002.0)), Ok)

    # forged reports: from a client, and from a worker that does not host the reservation
    forged = ExecReport(reservation=rid, client="alice", exec_id="e9", command="rm -rf /",
                        started_at=1003.0)
    error_of(bob.ask(forged), "forbidden")
    error_of(w2.report(forged), "forbidden", f"reservation {rid} is not on worker w2")
    error_of(w1.report(ExecReport(reservation="r-nope", client="alice", exec_id="e1",
                                  command="x", started_at=1.0)), "forbidden")

    mine = alice.ask(AuditList())
    assert isinstance(mine, AuditListReply)
    assert [(r["exec_id"], r["command"]) for r in mine.records] == [
        ("e2", "sleep 9"), ("e1", "echo hi")]
    first = mine.records[1]
    assert (first["reservation"], first["worker"], first["client"]) == (rid, "w1", "alice")
    assert (first["exit_code"], first["mode"], first["output_bytes"]) == (0, "output", 3)
    assert first["timed_out"] is False
    assert "signal" not in first
    assert mine.records[0]["signal"] == 2
    assert mine.records[0]["error"] == "interrupted"
    assert len(alice.ask(AuditList(limit=1)).records) == 1
    error_of(alice.ask(AuditList(client="bob")), "forbidden", "only admins")
    assert [r["client"] for r in bob.ask(AuditList()).records] == ["bob"]

    assert len(admin.ask(AuditList()).records) == 3
    assert [r["exec_id"] for r in admin.ask(AuditList(client="alice")).records] == ["e2", "e1"]
    assert [r["client"] for r in admin.ask(AuditList(worker="w2")).records] == ["bob"]
    assert len(admin.ask(AuditList(reservation=rid)).records) == 2


# ------------------------------------------------------------------- state machine, docs


def test_transition_table() -> None:
    S = ReservationState
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == {
        (S.OPENING, S.ACTIVE), (S.OPENING, S.ENDED), (S.ACTIVE, S.ENDED)}
    assert sources_of(S.ENDED) == {S.OPENING, S.ACTIVE}
    check_transition("r", S.OPENING, S.ACTIVE)
    with pytest.raises(Exception, match="ended -> active"):
        check_transition("r", S.ENDED, S.ACTIVE)


def test_documented_diagram_matches_table() -> None:
    import re

    section = DOC.read_text().split("## Reservations", 1)[1].split("\n## ", 1)[0]
    edges = re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\S.*)$", section, re.MULTILINE)
    drawn = {(ReservationState(a), ReservationState(b)) for a, b, _ in edges}
    assert drawn == {(a, b) for a, targets in TRANSITIONS.items() for b in targets}


def test_stale_worker_sessions_are_closed_from_heartbeats(make_grid: GridFactory) -> None:
    """A worker that missed a reservation.close (it was down, the broker restarted) and
    still lists the session in its heartbeats is told to close it; live ones are kept."""
    grid = make_grid()
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    live = alice.reserved("w1").reservation["id"]

    def beat(*rids: str) -> None:
        w1.heartbeat(1, interval_s=3600.0, cpu_percent=0.0, mem_used_bytes=0, free_slots=0,
                     running=[{"kind": "reservation", "id": r} for r in rids])

    beat(live, "r-stale")
    close = w1.wait_closed("r-stale")
    assert close.reason == "not reserved"
    assert w1.closed(live) is None  # the active one stays open
    assert isinstance(alice.ask(Release(reservation=live)), Ok)
    w1.wait_closed(live)
