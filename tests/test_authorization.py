"""Who may send what: the request tables of broker/request_roles.py, cell by cell, and
revoked principals on connections that stay open (issue 8, items 3 and 8).

Every cell of ``COORDINATOR_INBOX`` and ``WORKER_INBOX`` is exercised over a real broker
(the embedded amqtt and Mosquitto with the exported password file and ACL): a principal
of each role sends a request of each type that the coordinator (or the worker) could
serve, and the answer is ``forbidden`` exactly when the table says so. Requests are
built so that an allowed sender is really served (or gets a domain answer such as
``not_found``), never ``forbidden`` for some other reason.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.acl import Acl, Principal, Role
from broker.bus import Bus, Incoming, RequestTimeout
from broker.config import CoordinatorConfig
from broker.request_roles import COORDINATOR_INBOX, WORKER_INBOX
from coordinator import bootstrap
from coordinator.handling import Refusal, RequestGuard
from coordinator.reservation_state import ReservationState
from coordinator.store import Store
from schemas.codec import Envelope, envelope
from schemas.grants import public_key_to_text, sign_grant
from schemas.messages import (
    REGISTRY,
    Body,
    CoordPubkey,
    Error,
    ExecReport,
    ExecStarted,
    Ok,
    Ping,
    Pong,
    PrincipalsList,
    Release,
    Renew,
    ReservationOpen,
    Reserve,
    ReserveReply,
    WorkersList,
)
from tests.fixtures.actors import FakeWorker
from tests.fixtures.grid import ADMIN, COORDINATOR, GridHarness
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

TIMEOUT = 15.0
#: One principal per role (the coordinator role: a second one, beside the running
#: coordinator's own).
SENDERS = {Role.ADMIN: "boss", Role.CLIENT: "carol", Role.WORKER: "wrk",
           Role.COORDINATOR: "coord2"}


def ask(bus: Bus, inbox: str, body: Body) -> Any:
    """The reply body of a request (an ``Error`` is returned, not raised)."""
    reply: Envelope[Any] = bus.request(inbox, body, timeout=TIMEOUT, raise_errors=False)
    return reply.body


def is_forbidden(reply: Any) -> bool:
    return isinstance(reply, Error) and reply.code == "forbidden"


def make(mtype: str, **fields: Any) -> Body:
    return REGISTRY[mtype].from_dict(fields)


# ------------------------------------------------------------------------ coordinator


def coordinator_request(mtype: str, role: Role, rid: str) -> Body:
    """A request of ``mtype`` that a sender allowed to send it can be served."""
    victim = f"victim-{role.value}"
    bodies: dict[str, dict[str, Any]] = {
        "ping": {},
        "workers.list": {},
        "workers.show": {"worker": "nope"},
        "workers.drain": {"worker": "nope", "drain": True},
        "workers.forget": {"worker": "nope"},
        "reserve": {"worker": "nope"},
        "renew": {"reservation": "r-nope"},
        "release": {"reservation": "r-nope"},
        "reservations.list": {},
        "client.hello": {"session": "s-test"},
        "client.accepts": {"session": "s-test", "types": ["job.events"]},
        "client.gone": {"session": "s-test"},
        "audit.list": {},
        "exec.report": {"reservation": rid, "client": ADMIN, "exec_id": f"e-{role.value}",
                        "command": "true", "started_at": time.time(), "exit_code": 0},
        "principals.add": {"principal": f"new-{role.value}", "role": "client"},
        "principals.rotate": {"principal": victim},
        "principals.revoke": {"principal": victim},
        "principals.list": {},
        "mosquitto.export": {},
        "data.list": {},
        "data.show": {"key": "nope"},
        "data.rm": {"key": "nope"},
        "data.pin": {"key": "nope"},
        "data.share": {"key": "nope", "access": "public"},
        "apps.add": {"name": "nope", "kind": "command", "command": "true"},
        "apps.list": {},
        "apps.show": {"name": "nope"},
        "apps.rm": {"name": "nope", "all": True},
        "jobs.submit": {"jobs": [{"command": "true", "requirements": {"tags": ["nope"]}}]},
        "jobs.list": {},
        "jobs.show": {"job": "j-0000000000000000"},
        "jobs.cancel": {"jobs": ["j-0000000000000000"]},
        "jobs.hold": {"jobs": ["j-0000000000000000"]},
        "jobs.release": {"jobs": ["j-0000000000000000"]},
        "jobs.why": {"job": "j-0000000000000000"},
        "jobs.summary": {},
        "attempt.started": {"attempt": "a-0000000000000000"},
        "attempt.report": {"attempt": "a-0000000000000000", "kind": "success"},
    }
    assert mtype in bodies, f"no test request for {mtype}: add one here"
    return make(mtype, **bodies[mtype])


def test_coordinator_request_table_cell_by_cell(grid: GridHarness) -> None:
    grid.add_principals(*((p, r.value) for r, p in SENDERS.items()),
                        *((f"victim-{r.value}", "client") for r in Role))
    coordinator = grid.start_coordinator()
    registered = set(coordinator.bus._inbox_handlers)  # every type the coordinator serves
    # xfer.* are the transfer engine's: its storage admits them (coordinator/data_sink.py).
    registered = {t for t in registered if not t.startswith("xfer.")}
    assert registered == set(COORDINATOR_INBOX), "the table and the handlers differ"

    worker = grid.fake_worker(SENDERS[Role.WORKER])
    worker.join(heartbeat_s=3600.0)
    buses: dict[Role, Bus] = {Role.WORKER: worker.bus}
    for role in (Role.ADMIN, Role.CLIENT, Role.COORDINATOR):
        pid = SENDERS[role]
        buses[role] = grid.bus(pid, role.value, inbox=grid.topics.client_inbox(pid))
    held = ask(buses[Role.ADMIN], grid.topics.coord_inbox, Reserve(worker=worker.wid))
    assert isinstance(held, ReserveReply), held
    rid = held.reservation["id"]

    cells: dict[tuple[str, Role], Any] = {}
    for role in (Role.CLIENT, Role.WORKER, Role.COORDINATOR, Role.ADMIN):
        for mtype in COORDINATOR_INBOX:
            reply = ask(buses[role], grid.topics.coord_inbox,
                        coordinator_request(mtype, role, rid))
            cells[(mtype, role)] = reply
    wrong = {cell: reply for cell, reply in cells.items()
             if is_forbidden(reply) == COORDINATOR_INBOX[cell[0]].allows(cell[1])}
    assert not wrong, f"cells that disagree with the table: {wrong}"
    # What the allowed cells did, and the refused ones did not:
    assert isinstance(cells[("ping", Role.WORKER)], Pong)
    assert isinstance(cells[("exec.report", Role.WORKER)], Ok)
    assert isinstance(cells[("principals.revoke", Role.ADMIN)], Ok)
    assert grid.store.get_principal("new-admin") is not None
    for role in (Role.CLIENT, Role.WORKER, Role.COORDINATOR):
        assert grid.store.get_principal(f"new-{role.value}") is None
        victim = grid.store.get_principal(f"victim-{role.value}")
        assert victim is not None
        assert not victim.revoked


def test_a_worker_principal_cannot_reserve(grid: GridHarness) -> None:
    """Item 8: a worker principal got a renewable reservation on another worker."""
    grid.add_principals(("intruder", "worker"), ("victim", "worker"))
    grid.start_coordinator()
    victim = grid.fake_worker("victim")
    victim.join(heartbeat_s=3600.0)
    intruder = grid.fake_worker("intruder")
    reply = ask(intruder.bus, grid.topics.coord_inbox, Reserve(worker="victim"))
    assert is_forbidden(reply), reply
    assert "intruder is a worker principal" in reply.message
    assert grid.store.reservation_of_worker("victim") is None
    assert not victim.opens


# ------------------------------------------------------------------------------ worker


class StandInCoordinator:
    """The coordinator principal played by the test: it signs grants, opens sessions on
    the worker and acknowledges exec reports (no real coordinator runs)."""

    def __init__(self, grid: GridHarness) -> None:
        self.grid = grid
        self.key = Ed25519PrivateKey.generate()
        self.bus = grid.bus(COORDINATOR, "coordinator", inbox=grid.topics.coord_inbox,
                            start=False)
        self.bus.on_inbox("exec.report", lambda inc: self.bus.reply(inc, Ok()))
        self.bus.start(timeout=10)
        pubkey = CoordPubkey(alg="ed25519", key=public_key_to_text(self.key.public_key()))
        self.bus.publish(grid.topics.coord_pubkey, pubkey, retain=True).wait_for_publish(5)

    def open(self, wid: str, client: str) -> tuple[str, dict[str, Any]]:
        rid = f"r-{uuid.uuid4().hex[:12]}"
        reservation = {"id": rid, "worker": wid, "client": client,
                       "expires_at": time.time() + 120}
        reply = ask(self.bus, self.grid.topics.worker_inbox(wid),
                    ReservationOpen(reservation=reservation))
        assert isinstance(reply, Ok), reply
        return rid, reservation

    def grant(self, rid: str, wid: str, client: str) -> str:
        return sign_grant(self.key, rid=rid, client=client, worker=wid, exp=time.time() + 120)


def worker_request(mtype: str, grant: str, exec_id: str,
                   reservation: dict[str, Any]) -> Body:
    """A request of ``mtype`` that a sender allowed to send it can be served."""
    bodies: dict[str, dict[str, Any]] = {
        "ping": {},
        "caps.refresh": {},
        "reservation.open": {"reservation": reservation},  # already open: ok, existing
        "reservation.close": {"reservation": "r-never-opened"},
        "exec.start": {"grant": grant, "exec_id": uuid.uuid4().hex[:12], "command": "true",
                       "mode": "background"},
        "exec.signal": {"grant": grant, "exec_id": exec_id, "signal": "TERM"},
        "exec.stdin": {"grant": grant, "exec_id": exec_id, "seq": 0, "data": ""},
        "exec.resize": {"grant": grant, "exec_id": exec_id, "rows": 24, "cols": 80},
        "exec.list": {"grant": grant},
        "exec.logs": {"grant": grant, "exec_id": exec_id},
        "job.assign": {"attempt": "a-0000000000000000", "job": "j-0000000000000000",
                       "owner": "nobody", "spec": {"command": "true"}, "inputs": [],
                       "lease_s": 60.0},
        "job.kill": {"attempt": "a-0000000000000000", "reason": "test"},
        "job.follow": {"attempt": "a-0000000000000000", "follow": "f-test"},  # not_found
        # The stand-in coordinator serves no data: refused once the grant passed.
        "workdir.fetch": {"reservation": reservation["id"], "grant": grant,
                          "sha256": "0" * 64, "path": "x"},
    }
    assert mtype in bodies, f"no test request for {mtype}: add one here"
    return make(mtype, **bodies[mtype])


def test_worker_request_table_cell_by_cell(grid: GridHarness) -> None:
    grid.add_principals((SENDERS[Role.ADMIN], "admin"), (SENDERS[Role.CLIENT], "client"))
    coord = StandInCoordinator(grid)
    handle = grid.start_worker("wx", slots=2, wait_online=False)
    assert handle.agent is not None
    service = handle.agent.exec_service
    assert service is not None
    assert service.key_ready.wait(10), "the worker never got the grant key"
    wid = handle.wid
    inbox = grid.topics.worker_inbox(wid)
    wait_for(lambda: _answers(coord.bus, inbox), message="the worker does not answer")
    # replies aside, and the transfer engine's xfer.* (its WorkdirFiles storage checks the
    # grant, role and rate of every offer and fetch: tests/test_file_copy.py)
    registered = {t for t in handle.agent.bus._inbox_handlers
                  if t not in ("ok", "error") and not t.startswith("xfer.")}
    assert registered == set(WORKER_INBOX), "the table and the handlers differ"

    buses: dict[Role, Bus] = {Role.COORDINATOR: coord.bus}
    for role in (Role.ADMIN, Role.CLIENT):
        pid = SENDERS[role]
        buses[role] = grid.bus(pid, role.value, inbox=grid.topics.client_inbox(pid))
    # Each person holds a session of its own, with a command in it; the coordinator
    # tries with the client's grant.
    sessions: dict[Role, tuple[str, dict[str, Any], str]] = {}
    for role in (Role.CLIENT, Role.ADMIN):
        rid, reservation = coord.open(wid, SENDERS[role])
        grant = coord.grant(rid, wid, SENDERS[role])
        started = ask(buses[role], inbox, make("exec.start", grant=grant, exec_id=f"x-{role}",
                                               command="sleep 30", mode="background"))
        assert isinstance(started, ExecStarted), started
        sessions[role] = (grant, reservation, started.exec_id)
    sessions[Role.COORDINATOR] = sessions[Role.CLIENT]

    cells: dict[tuple[str, Role], Any] = {}
    for role in (Role.CLIENT, Role.COORDINATOR, Role.ADMIN):
        grant, reservation, exec_id = sessions[role]
        for mtype in WORKER_INBOX:
            cells[(mtype, role)] = ask(buses[role], inbox,
                                       worker_request(mtype, grant, exec_id, reservation))
    wrong = {cell: reply for cell, reply in cells.items()
             if is_forbidden(reply) == WORKER_INBOX[cell[0]].allows(cell[1])}
    assert not wrong, f"cells that disagree with the table: {wrong}"
    assert isinstance(cells[("caps.refresh", Role.COORDINATOR)], Ok)
    assert isinstance(cells[("exec.start", Role.CLIENT)], ExecStarted)
    assert isinstance(cells[("ping", Role.CLIENT)], Pong)
    # Workers never reach another worker's inbox: the broker's ACL refuses the publish.
    acl = Acl(grid.root)
    other = Principal("w-other", Role.WORKER)
    assert not acl.can_publish(other, grid.topics.inbox_for(inbox, other.id))
    for role in (Role.CLIENT, Role.ADMIN):
        rid = sessions[role][1]["id"]
        assert isinstance(ask(coord.bus, inbox, make("reservation.close", reservation=rid)),
                          Ok)


def _answers(bus: Bus, inbox: str) -> bool:
    try:
        return isinstance(ask_quick(bus, inbox, Ping()), Pong)
    except RequestTimeout:
        return False


def ask_quick(bus: Bus, inbox: str, body: Body) -> Any:
    reply: Envelope[Any] = bus.request(inbox, body, timeout=0.5, raise_errors=False)
    return reply.body


# -------------------------------------------------------------------------- revocation


def test_a_revoke_over_the_bus_refuses_the_next_request_at_once(grid: GridHarness) -> None:
    """Item 3: revoked, the principal's open connection may not reserve, renew or ask
    anything; on the embedded broker the connection is also cut. What it held ends at
    once: on Mosquitto its connection stays up until the next export, and its grant
    would otherwise stay good on the worker until the lease ran out."""
    from client.admin import Admin
    from client.api import Grid

    grid.add_principals(("eve", "client"), ("w1", "worker"), ("w2", "worker"))
    grid.start_coordinator()
    workers = [grid.fake_worker(wid) for wid in ("w1", "w2")]
    for worker in workers:
        worker.join(heartbeat_s=3600.0)
    eve = grid.bus("eve", "client", inbox=grid.topics.client_inbox("eve"),
                   reconnect_min_s=30, reconnect_max_s=30)
    held = ask(eve, grid.topics.coord_inbox, Reserve(worker="w1", lease_s=60))
    assert isinstance(held, ReserveReply), held
    rid = held.reservation["id"]
    before = grid.store.get_reservation(rid)
    assert before is not None

    admin: Grid = grid.client(ADMIN, "admin")
    Admin(admin).revoke("eve")
    ended = grid.store.get_reservation(rid)
    assert ended is not None
    assert ended.state == ReservationState.ENDED
    assert "revoked" in ended.ended_reason
    assert "revoked" in (workers[0].wait_closed(rid).reason or "")

    for body in (Renew(reservation=rid), Reserve(worker="w2"), Ping(),
                 Release(reservation=rid)):
        try:
            reply = eve.request(grid.topics.coord_inbox, body, timeout=3.0,
                                raise_errors=False).body
        except RequestTimeout:
            reply = None  # cut by the broker (amqtt): nothing reached the coordinator
        assert reply is None or is_forbidden(reply), (body, reply)
        if reply is not None:
            assert "revoked" in reply.message
    after = grid.store.get_reservation(rid)
    assert after is not None
    assert after.expires_at == before.expires_at, "the revoked principal renewed"
    assert after.ended_reason == ended.ended_reason, "the revoked principal released"
    assert grid.store.reservation_of_worker("w2") is None


def test_a_revoke_in_the_database_is_seen_by_the_running_coordinator(
        grid: GridHarness) -> None:
    """``xcloud admin --db`` revokes in the database behind the coordinator's back; the
    broker is not told (no recheck), so the connection stays: the coordinator must stop
    serving it anyway (within its principal cache's lifetime)."""
    grid.add_principals(("eve", "client"), ("w1", "worker"))
    grid.start_coordinator()
    grid.fake_worker("w1").join(heartbeat_s=3600.0)
    eve = grid.bus("eve", "client", inbox=grid.topics.client_inbox("eve"))
    assert isinstance(ask(eve, grid.topics.coord_inbox, Ping()), Pong)

    bootstrap.revoke(grid.store, "eve")

    wait_for(lambda: is_forbidden(ask(eve, grid.topics.coord_inbox, Ping())), timeout=10,
             message="the coordinator kept serving a revoked principal")
    assert is_forbidden(ask(eve, grid.topics.coord_inbox, Reserve(worker="w1")))
    assert grid.store.reservation_of_worker("w1") is None


def test_exec_report_is_refused_for_the_wrong_role_even_with_a_holder_name(
        grid: GridHarness) -> None:
    """A client cannot write the audit trail, whatever the report says."""
    grid.add_principals(("carol", "client"), ("w1", "worker"))
    grid.start_coordinator()
    worker: FakeWorker = grid.fake_worker("w1")
    worker.join(heartbeat_s=3600.0)
    carol = grid.bus("carol", "client", inbox=grid.topics.client_inbox("carol"))
    held = ask(carol, grid.topics.coord_inbox, Reserve(worker="w1"))
    assert isinstance(held, ReserveReply), held
    rid = held.reservation["id"]
    forged = ExecReport(reservation=rid, client="carol", exec_id="e1", command="true",
                        started_at=time.time(), exit_code=0)
    reply = ask(carol, grid.topics.coord_inbox, forged)
    assert is_forbidden(reply), reply
    assert "carol is a client principal" in reply.message
    assert grid.store.list_exec_audit(reservation_id=rid) == []


def test_unknown_principals_are_clients_only_in_anonymous_mode(tmp_path: Path) -> None:
    """The broker's anonymous mode admits senders the store does not know (as clients);
    otherwise an unknown sender is refused like a revoked one."""
    store = Store.open(f"sqlite:///{tmp_path / 'guard.db'}")
    try:
        bootstrap.issue_token(store, "gone", "admin")
        bootstrap.revoke(store, "gone")
        strict = RequestGuard(store, CoordinatorConfig())
        open_grid = RequestGuard(store, CoordinatorConfig(), anonymous_role=Role.CLIENT)
        for sender in ("stranger", "gone"):
            with pytest.raises(Refusal, match="unknown or revoked"):
                strict.admit(_request(WorkersList(), sender))
        open_grid.admit(_request(WorkersList(), "stranger"))
        with pytest.raises(Refusal, match="not an admin"):
            open_grid.admit(_request(PrincipalsList(), "stranger"))
        with pytest.raises(Refusal, match="unknown or revoked"):
            open_grid.admit(_request(WorkersList(), "gone"))
    finally:
        store.close()


def _request(body: Body, sender: str) -> Incoming:
    return Incoming(f"x/coord/inbox/{sender}", envelope(body, reply_to=f"x/client/{sender}/inbox"),
                    sender)
