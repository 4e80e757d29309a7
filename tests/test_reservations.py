"""Reservations and grants, coordinator side, over a real broker (docs/protocol.md).

Each test runs the embedded amqtt broker on a free port, authenticating against a store in
``tmp_path`` (the race tests also against MariaDB), a real ``Coordinator``, clients that are
plain ``Bus`` objects logged in as client/admin principals, and *fake workers*: a ``Bus``
logged in as a worker principal that publishes caps + status online and answers
``reservation.open`` as the test wants (ok, an error, or not at all). The worker agent's own
reservation code is tested elsewhere; nothing here depends on it.

Everything waits on observed messages or store state (``wait_for``), never on sleeps.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Bus, Incoming, Will
from broker.config import BusConfig, Config
from broker.embedded import BrokerSettings, EmbeddedBroker
from client.admin import issue_token
from coordinator.auth import store_authenticator
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
    ReservationClose,
    ReservationEnded,
    ReservationOpen,
    ReservationsList,
    ReservationsListReply,
    Reserve,
    ReserveReply,
    WorkerCaps,
    WorkerHeartbeat,
    WorkerStatus,
)
from schemas.topics import Topics
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

TOPICS = Topics()
REQUEST_TIMEOUT = 15.0
DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machines.md"


# ----------------------------------------------------------------------------- actors


class Client:
    """A client principal on its own bus; records the reservation.ended it is sent."""

    def __init__(self, url: str, cid: str, token: str) -> None:
        self.cid = cid
        cfg = BusConfig(url=url, principal=cid, token=token, reconnect_min_s=0.5,
                        reconnect_max_s=1.0, request_timeout_s=REQUEST_TIMEOUT)
        self.bus = Bus(cfg, client_id=f"{cid}-{uuid.uuid4().hex[:8]}",
                       inbox=TOPICS.client_inbox(cid))
        self.session = self.bus.client_id
        self.ended: list[ReservationEnded] = []
        self._lock = threading.Lock()
        self.bus.on_inbox("reservation.ended", self._on_ended)

    def start(self) -> Client:
        self.bus.start(timeout=10)
        return self

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
        reply: Envelope[Any] = self.bus.request(TOPICS.coord_inbox, body, timeout=timeout,
                                                raise_errors=False)
        return reply.body

    def reserve(self, worker: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("session", self.session)
        return self.ask(Reserve(worker=worker, **kwargs))

    def reserved(self, worker: str | None = None, **kwargs: Any) -> ReserveReply:
        reply = self.reserve(worker, **kwargs)
        assert isinstance(reply, ReserveReply), reply
        return reply

    def stop(self) -> None:
        self.bus.stop()


class FakeWorker:
    """A worker principal that announces itself and answers reservation.open on demand."""

    def __init__(self, url: str, wid: str, token: str, *, name: str | None = None,
                 tags: list[str] | None = None, cpus: int = 4,
                 executors: list[str] | None = None, images: list[str] | None = None) -> None:
        self.wid = wid
        self.mode = "ok"  # ok | error | silent
        self.opens: list[ReservationOpen] = []
        self.closes: list[ReservationClose] = []
        self._lock = threading.Lock()
        cfg = BusConfig(url=url, principal=wid, token=token, reconnect_min_s=0.5,
                        reconnect_max_s=1.0, request_timeout_s=REQUEST_TIMEOUT)
        self.bus = Bus(cfg, client_id=f"worker-{wid}", inbox=TOPICS.worker_inbox(wid))
        self.bus.on_inbox("reservation.open", self._on_open)
        self.bus.on_inbox("reservation.close", self._on_close)
        self.caps = WorkerCaps(
            wid=wid, name=name or f"name-{wid}", tags=tags or ["linux"], slots=1,
            executors=executors or ["process"],
            host={"hostname": f"h-{wid}", "os": "linux", "arch": "x86_64"},
            cpu={"count": cpus}, memory_bytes=8 * 2**30,
            docker={"available": bool(images), "images": images or []},
            heartbeat_s=3600.0,  # no liveness deadline during a test
        )

    def start(self) -> FakeWorker:
        self.bus.start(timeout=10)
        self.bus.publish(TOPICS.worker_caps(self.wid), self.caps, retain=True)
        self.status("online", clean=True)
        return self

    def status(self, state: str, *, clean: bool, reason: str | None = None) -> None:
        self.bus.publish(TOPICS.worker_status(self.wid),
                         WorkerStatus(wid=self.wid, state=state, clean=clean, reason=reason),
                         retain=True)

    def crash(self) -> None:
        """What the broker publishes for a worker that died: its last will."""
        self.status("offline", clean=False, reason="connection lost")

    def _on_open(self, incoming: Incoming) -> None:
        with self._lock:
            self.opens.append(incoming.body)
        if self.mode == "ok":
            self.bus.reply(incoming, Ok())
        elif self.mode == "error":
            self.bus.reply_error(incoming, "conflict", "cannot prepare the work dir")

    def _on_close(self, incoming: Incoming) -> None:
        with self._lock:
            self.closes.append(incoming.body)

    def closed(self, rid: str) -> ReservationClose | None:
        with self._lock:
            return next((c for c in self.closes if c.reservation == rid), None)

    def wait_closed(self, rid: str, timeout: float = 10.0) -> ReservationClose:
        found = wait_for(lambda: self.closed(rid), timeout,
                         message=f"{self.wid} told to close {rid}")
        assert found is not None
        return found

    def report(self, body: ExecReport) -> Any:
        reply: Envelope[Any] = self.bus.request(TOPICS.coord_inbox, body, raise_errors=False)
        return reply.body

    def stop(self) -> None:
        self.bus.stop()


@dataclass
class Grid:
    """Broker + store + coordinator, and the actors a test creates."""

    tmp_path: Path
    store: Store
    broker: EmbeddedBroker
    config: Config
    coordinator: Coordinator | None = None
    actors: list[Client | FakeWorker] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.broker.url

    def start_coordinator(self) -> Coordinator:
        self.coordinator = Coordinator(self.config, self.store)
        self.coordinator.start()
        return self.coordinator

    def restart_coordinator(self) -> Coordinator:
        assert self.coordinator is not None
        self.coordinator.stop()
        return self.start_coordinator()

    @property
    def coord(self) -> Coordinator:
        assert self.coordinator is not None
        return self.coordinator

    @property
    def service(self) -> Any:
        return self.coord.reservations

    def client(self, cid: str, role: str = "client") -> Client:
        client = Client(self.url, cid, issue_token(self.store, cid, role))
        self.actors.append(client)
        return client.start()

    def worker(self, wid: str, **kwargs: Any) -> FakeWorker:
        worker = FakeWorker(self.url, wid, issue_token(self.store, wid, "worker"), **kwargs)
        self.actors.append(worker)
        worker.start()
        wait_for(lambda: self.worker_state(wid) == WorkerState.ONLINE, 10,
                 message=f"coordinator sees {wid} online")
        return worker

    def worker_state(self, wid: str) -> WorkerState | None:
        record = self.store.get_worker(wid)
        return record.state if record else None

    def close(self) -> None:
        for actor in self.actors:
            actor.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        self.broker.stop_in_thread()
        self.store.close()


GridFactory = Callable[..., Grid]


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Every thread a test started is gone at its end."""
    before = set(threading.enumerate())
    yield
    wait_for(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
             10, message=f"leaked threads: {set(threading.enumerate()) - before}")


@pytest.fixture
def make_grid(tmp_path: Path, no_leaks: None) -> Iterator[GridFactory]:
    """``make_grid(db_url=None, **coordinator_settings)`` -> a started Grid."""
    grids: list[Grid] = []

    def make(db_url: str | None = None, **settings: Any) -> Grid:
        store = Store.open(db_url or f"sqlite:///{tmp_path}/state/xcloud.db")
        try:
            broker = EmbeddedBroker(BrokerSettings(port=0, root=TOPICS.root),
                                    store_authenticator(store))
            broker.start_in_thread()
        except BaseException:
            store.close()
            raise
        config = Config(home=tmp_path / "home")
        config.bus.url = broker.url
        config.bus.principal = "coordinator"
        config.bus.token = issue_token(store, "coordinator", "coordinator")
        config.bus.reconnect_min_s = 0.5
        config.bus.reconnect_max_s = 1.0
        config.coordinator.open_timeout_s = 2.0
        config.coordinator.client_grace_s = 0.5
        for key, value in settings.items():
            setattr(config.coordinator, key, value)
        grid = Grid(tmp_path, store, broker, config)
        grids.append(grid)
        grid.start_coordinator()
        return grid

    yield make
    for grid in grids:
        grid.close()


@pytest.fixture
def grid(make_grid: GridFactory) -> Grid:
    return make_grid()


def error_of(reply: Any, code: str, *fragments: str) -> Error:
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply
    for fragment in fragments:
        assert fragment in reply.message, reply
    return reply


def live_reservations(grid: Grid) -> list[Any]:
    return grid.store.list_reservations(states=[ReservationState.OPENING,
                                                ReservationState.ACTIVE])


# ------------------------------------------------------------------------- reserving


def test_reserve_by_id_then_by_name(grid: Grid) -> None:
    w1 = grid.worker("w1", name="alpha")
    alice = grid.client("alice")

    reply = alice.reserved("w1")
    res = reply.reservation
    assert (res["worker"], res["worker_name"], res["client"]) == ("w1", "alpha", "alice")
    assert res["state"] == "active" and res["session"] == alice.session
    assert res["lease_s"] == 30.0 and res["executor"] == "process"
    assert len(w1.opens) == 1
    opened = w1.opens[0].reservation
    assert (opened["id"], opened["client"], opened["state"]) == (res["id"], "alice", "opening")
    assert grid.service.is_reserved("w1")

    assert isinstance(alice.ask(Release(reservation=res["id"])), Ok)
    assert not grid.service.is_reserved("w1")
    again = alice.reserved("alpha")  # by name
    assert again.reservation["worker"] == "w1" and again.reservation["id"] != res["id"]


def test_reserve_any_matches_requirements(grid: Grid) -> None:
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


def test_unknown_and_lost_workers_are_refused(grid: Grid) -> None:
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


def test_already_reserved_and_per_principal_limit(grid: Grid) -> None:
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


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_ten_clients_race_for_one_worker(make_grid: GridFactory, backend: str,
                                         request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("fresh_mariadb_url") if backend == "mariadb" else None
    grid = make_grid(url)
    worker = grid.worker("w1")
    clients = [grid.client(f"c{i}") for i in range(10)]
    futures: list[Future[Envelope[Any]]] = [
        c.bus.request_async(TOPICS.coord_inbox, Reserve(worker="w1", session=c.session))
        for c in clients
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


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def test_store_admits_one_holder_under_concurrency(tmp_path: Path, backend: str,
                                                   request: pytest.FixtureRequest) -> None:
    """The unique index itself, without the coordinator: 16 threads insert at once."""
    url = (request.getfixturevalue("fresh_mariadb_url") if backend == "mariadb"
           else f"sqlite:///{tmp_path}/race.db")
    with Store.open(url) as store:
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
        assert len(lost) == 15 and all(isinstance(e, WorkerAlreadyReserved) for e in lost), lost
        ended = store.end_reservation(won[0], "done", 3.0)
        assert ended is not None and ended[0] == ReservationState.OPENING
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
    pending = alice.bus.request_async(TOPICS.coord_inbox, Reserve(worker="slow"))
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
    assert record is not None and record.state == ReservationState.ENDED
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
    pending = alice.bus.request_async(TOPICS.coord_inbox, Reserve(worker="w1"))
    wait_for(lambda: w1.opens, 5, message="w1 asked to open")
    rid = w1.opens[0].reservation["id"]
    w1.crash()
    w1.wait_closed(rid)
    error_of(pending.result(REQUEST_TIMEOUT).body, "unavailable", REASON_WORKER_LOST)
    assert alice.ended_for(rid) is None


def test_worker_refusing_open(grid: Grid) -> None:
    w1 = grid.worker("w1")
    w1.mode = "error"
    reply = error_of(grid.client("alice").reserve("w1"), "unavailable",
                     "worker w1 refused the reservation: cannot prepare the work dir")
    assert reply.detail == {"worker_code": "conflict"}
    assert not live_reservations(grid)


# ------------------------------------------------------------------------- grants, renew


def test_grant_verifies_with_published_key(grid: Grid) -> None:
    grid.worker("w1")
    alice = grid.client("alice")
    keys: list[CoordPubkey] = []
    alice.bus.subscribe(TOPICS.coord_pubkey, lambda m: keys.append(m.body))
    wait_for(lambda: keys, 5, message="retained coord.pubkey")
    assert keys[0].alg == "ed25519" and keys[0].key == grid.coord.grant_key.public_text
    key_file = grid.config.data_dir / "grant_key.pem"
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600

    reply = alice.reserved("w1")
    claims = verify_grant(public_key_from_text(keys[0].key), reply.grant, client="alice",
                          worker="w1")
    assert claims.rid == reply.reservation["id"]
    assert claims.exp == reply.reservation["expires_at"]
    assert claims.kid == keys[0].kid


def test_renew_gives_a_fresh_grant_with_a_later_expiry(grid: Grid) -> None:
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


def test_release_by_holder_admin_and_stranger(grid: Grid) -> None:
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
    assert record is not None and record.state == ReservationState.ENDED
    assert record.ended_at is not None and record.ended_at >= reply.reservation["expires_at"]
    assert not grid.service.is_reserved("w1")
    error_of(alice.ask(Renew(reservation=rid)), "conflict", "lease expired")


def test_worker_lost_ends_reservation_and_holder_moves_on(grid: Grid) -> None:
    w1 = grid.worker("w1")
    grid.worker("w2")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    w1.crash()
    ended = alice.wait_ended(rid)
    assert (ended.reason, ended.worker) == (REASON_WORKER_LOST, "w1")
    w1.wait_closed(rid)
    assert alice.reserved("w2").reservation["worker"] == "w2"


def test_worker_going_offline_ends_reservation(grid: Grid) -> None:
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    w1.status("offline", clean=True)
    ended = alice.wait_ended(rid)
    assert ended.reason == REASON_WORKER_OFFLINE
    assert w1.wait_closed(rid).reason == REASON_WORKER_OFFLINE


def test_client_gone_ends_after_grace(grid: Grid) -> None:
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    rid = alice.reserved("w1").reservation["id"]
    # someone else cannot make alice's session disappear
    bob = grid.client("bob")
    bob.ask(ClientGone(session=alice.session))
    record = grid.store.get_reservation(rid)
    assert record is not None and record.client_gone_at is None

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
    assert record is not None and record.client_gone_at is not None
    assert isinstance(alice.ask(ClientHello(session=alice.session)), Ok)
    assert grid.service._timers.deadline(key) is None
    record = grid.store.get_reservation(rid)
    assert record is not None and record.client_gone_at is None and record.live
    # a renewal also proves the holder alive
    alice.ask(ClientGone(session=alice.session))
    assert isinstance(alice.ask(Renew(reservation=rid)), ReserveReply)
    record = grid.store.get_reservation(rid)
    assert record is not None and record.client_gone_at is None


def test_client_last_will_ends_reservation(grid: Grid) -> None:
    """The real thing: the broker publishes client.gone when the connection dies."""
    grid.worker("w1")
    token = issue_token(grid.store, "carol", "client")
    client_id = f"carol-{uuid.uuid4().hex[:8]}"
    carol = Client(grid.url, "carol", token)
    carol.bus.stop()  # replace its bus by one with a last will
    cfg = BusConfig(url=grid.url, principal="carol", token=token, reconnect_min_s=30,
                    reconnect_max_s=30, request_timeout_s=REQUEST_TIMEOUT)
    carol.bus = Bus(cfg, client_id=client_id, inbox=TOPICS.client_inbox("carol"),
                    will=Will(TOPICS.inbox_for(TOPICS.coord_inbox, "carol"),
                              ClientGone(session=client_id), retain=False))
    carol.session = client_id
    grid.actors.append(carol)
    carol.start()
    rid = carol.reserved("w1").reservation["id"]
    sock = carol.bus._client.socket()
    assert sock is not None
    sock.close()  # the connection dies without DISCONNECT: the broker sends the will
    wait_for(lambda: (r := grid.store.get_reservation(rid)) and r.state ==
             ReservationState.ENDED, 15, message="reservation ended by the last will")
    record = grid.store.get_reservation(rid)
    assert record is not None and record.ended_reason == REASON_CLIENT_GONE


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


def test_restart_ends_reservations_left_opening(grid: Grid) -> None:
    w1 = grid.worker("w1")
    grid.coord.stop()
    grid.store.create_reservation(rid="r-crashed", worker_id="w1", client_id="alice",
                                  lease_s=30, now=1.0)
    grid.start_coordinator()
    record = grid.store.get_reservation("r-crashed")
    assert record is not None and record.state == ReservationState.ENDED
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


def test_reservations_list(grid: Grid) -> None:
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


def test_exec_reports_make_the_audit_trail(grid: Grid) -> None:
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
    assert first["timed_out"] is False and "signal" not in first
    assert mine.records[0]["signal"] == 2 and mine.records[0]["error"] == "interrupted"
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


def test_stale_worker_sessions_are_closed_from_heartbeats(grid: Grid) -> None:
    """A worker that missed a reservation.close (it was down, the broker restarted) and
    still lists the session in its heartbeats is told to close it; live ones are kept."""
    w1 = grid.worker("w1")
    alice = grid.client("alice")
    live = alice.reserved("w1").reservation["id"]

    def beat(*rids: str) -> None:
        w1.bus.publish(TOPICS.worker_heartbeat("w1"), WorkerHeartbeat(
            wid="w1", seq=1, interval_s=3600.0, cpu_percent=0.0, mem_used_bytes=0,
            free_slots=0, running=[{"kind": "reservation", "id": r} for r in rids]), qos=0)

    beat(live, "r-stale")
    close = w1.wait_closed("r-stale")
    assert close.reason == "not reserved"
    assert w1.closed(live) is None  # the active one stays open
    assert isinstance(alice.ask(Release(reservation=live)), Ok)
    w1.wait_closed(live)
