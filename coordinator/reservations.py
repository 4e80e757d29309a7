"""Reservations: a client's exclusive, leased use of one worker, and the exec audit trail.

The flow (docs/protocol.md, "Reservations and grants"): ``reserve`` records the
reservation OPENING (the database's unique ``active_worker`` index makes one holder per
worker true under races), asks the worker to ``reservation.open``, and only on its ``ok``
makes it ACTIVE and signs a grant whose ``exp`` is the lease end. Every end (release,
lease expiry, worker lost/offline, client gone past its grace) goes through ``_end``:
one conditional update in the store decides the single winner, which then tells the
worker (``reservation.close``) and, when the holder did not ask for it,
the holder (``reservation.ended``).

Threads: ``reserve`` waits up to ``open_timeout_s`` for the worker, so it runs on a
small pool, never on a bus lane (ten reserves must not queue behind one silent worker).
The other requests share one lane, which keeps ``client.gone``/``client.hello`` in
order. Lease and grace deadlines live in one timer thread
(``coordinator.reservation_timers``) and are rebuilt from the database on start, so
reservations survive a restart. Which worker a ``reserve any`` gets is
``coordinator.matching``'s call; the reply dicts are ``coordinator.wire``'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from broker.acl import Role
from broker.bus import Bus, BusError, Incoming, Lane, RemoteError, RequestTimeout
from broker.config import CoordinatorConfig
from coordinator import matching, wire
from coordinator.audit import AuditWriter
from coordinator.errors import CoordinatorError, NotFound, StoreError
from coordinator.handling import Refusal, guarded, screened
from coordinator.keys import GrantKey
from coordinator.registry import WorkerRegistry
from coordinator.reservation_state import (
    LIVE_STATES,
    ReservationState,
    WorkerAlreadyReserved,
    WorkerNotReservable,
)
from coordinator.reservation_timers import ReservationTimers
from coordinator.store import ReservationRecord, Store, WorkerRecord
from coordinator.worker_state import WorkerState
from schemas.messages import (
    AuditList,
    AuditListReply,
    Body,
    ClientGone,
    ClientHello,
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
)
from schemas.topics import Topics

log = logging.getLogger(__name__)

RESERVE_THREADS = 16  # reserves waiting on workers at once; more queue in the pool
LIST_LIMIT = 1000  # newest reservations in one reservations.list reply
AUDIT_DEFAULT_LIMIT = 100
REASON_MAX = 1024

# ended_reason values (stable: clients and tests match on them)
REASON_EXPIRED = "lease expired"
REASON_WORKER_LOST = "worker lost"
REASON_WORKER_OFFLINE = "worker went offline"
REASON_CLIENT_GONE = "client disappeared"
REASON_RESTARTED = "coordinator restarted during open"
REASON_REVOKED = "the holder's principal was revoked"

def new_reservation_id() -> str:
    return f"r-{uuid.uuid4().hex[:16]}"


class ReservationService:
    """Handlers and timers for reservations; wired in by ``coordinator.service``.

    ``start`` (before the bus connects) ends reservations a crash left OPENING, re-arms
    leases and client-gone grace timers from the database and starts listening to worker
    state changes; ``register`` puts the handlers on the bus; ``stop`` then ``join``
    shut it down (``join`` after the bus stopped, which fails pending open requests).
    """

    def __init__(self, bus: Bus, store: Store, registry: WorkerRegistry,
                 config: CoordinatorConfig, key: GrantKey, *, topics: Topics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.store = store
        self.registry = registry
        self.config = config
        self.key = key
        self.topics = topics or bus.topics
        self._clock = clock
        self._timers = ReservationTimers(self._lease_ran_out, self._grace_ran_out, clock=clock,
                                         link=bus.link_state,
                                         resume_grace_s=config.reconnect_grace_s)
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._holders: dict[str, tuple[str, str]] = {}
        self.audit = AuditWriter(store)
        # (principal, session) of each client.hello and client.gone (the job events
        # outbox: which sessions of a principal take job.events)
        self.hello_listeners: list[Callable[[str, str], None]] = []
        self.gone_listeners: list[Callable[[str, str], None]] = []

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.registry.state_listeners.append(self._on_worker_state)
        self._pool = ThreadPoolExecutor(RESERVE_THREADS, thread_name_prefix="reserve")
        self._recover()
        self._timers.start()
        self.audit.start()

    def register(self) -> None:
        self.bus.on_inbox("reserve", self._submit_reserve, lane=Lane.RESERVE)
        table: dict[str, Callable[[Incoming], Body | None]] = {
            "renew": self.renew,
            "release": self.release,
            "reservations.list": self.reservations_list,
            "client.hello": self.client_hello,
            "client.gone": self.client_gone,
            "exec.report": self.exec_report,
            "audit.list": self.audit_list,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, self._guard(fn), lane=Lane.RESERVATIONS)

    def stop(self) -> None:
        """Stop timers and take no new reserves (call before stopping the bus)."""
        if self._on_worker_state in self.registry.state_listeners:
            self.registry.state_listeners.remove(self._on_worker_state)
        self._timers.stop()
        self.audit.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Wait for reserves in flight (call after the bus stopped: they fail fast then)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def announce(self) -> None:
        """Publish the grant-verifying public key, retained (after every connect)."""
        self.bus.publish(self.topics.coord_pubkey, self.key.pubkey_message(), retain=True)

    # -- queries for other services --------------------------------------------------

    def is_reserved(self, wid: str) -> bool:
        """True while a live reservation holds ``wid``: such a worker takes no batch work."""
        return self.store.reservation_of_worker(wid) is not None

    def reserved_workers(self) -> set[str]:
        return self.store.reserved_worker_ids()

    # -- recovery ------------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild from the database what a previous coordinator process left."""
        for record in self.store.list_reservations(states=[ReservationState.OPENING]):
            self._end(record.id, REASON_RESTARTED)
        active = self.store.list_reservations(states=[ReservationState.ACTIVE])
        for record in active:
            worker = self.store.get_worker(record.worker_id)
            if worker is None or worker.state in (WorkerState.LOST, WorkerState.OFFLINE):
                offline = worker is not None and worker.state == WorkerState.OFFLINE
                self._end(record.id, REASON_WORKER_OFFLINE if offline else REASON_WORKER_LOST)
                continue
            self._timers.arm_lease(record.id, record.expires_at)
            if record.client_gone_at is not None:
                self._timers.arm_grace(record.client_id, record.session,
                                       record.client_gone_at + self.config.client_grace_s)
        if active:
            log.info("re-armed %d active reservation(s)", len(active))

    # -- handler plumbing --------------------------------------------------------------

    def _guard(self, fn: Callable[[Incoming], Body | None]) -> Callable[[Incoming], None]:
        return guarded(self.bus, fn)

    def _submit_reserve(self, incoming: Incoming) -> None:
        """Admit on the lane (a refused or rate-limited reserve never queues in the pool),
        then wait on the worker in the pool."""
        if not screened(self.bus, incoming):
            return
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("not started")
            pool.submit(guarded(self.bus, self.reserve, admitted=True), incoming)
        except RuntimeError:
            self.bus.reply_error(incoming, "unavailable", "the coordinator is stopping")

    def _is_admin(self, principal: str) -> bool:
        record = self.store.get_principal(principal)
        return record is not None and not record.revoked and record.role == Role.ADMIN.value

    def _owned(self, rid: str, sender: str, *, admin_ok: bool) -> ReservationRecord:
        record = self.store.get_reservation(rid)
        if record is None:
            raise Refusal("not_found", f"no reservation {rid}")
        if record.client_id != sender and not (admin_ok and self._is_admin(sender)):
            who = "its holder or an admin" if admin_ok else "its holder"
            raise Refusal("forbidden", f"reservation {rid} belongs to {record.client_id}; "
                          f"only {who} may do that")
        return record

    # -- reserve -------------------------------------------------------------------------

    def reserve(self, incoming: Incoming) -> Body:
        req: Reserve = incoming.body
        client = incoming.sender
        assert client is not None
        requirements = dict(req.any or {})
        if req.image and requirements.get("executor") not in (None, "docker"):
            raise Refusal("invalid", f"image {req.image} needs the docker executor, not "
                          f"{requirements['executor']}")
        lease = min(req.lease_s if req.lease_s is not None else self.config.default_lease_s,
                    self.config.max_lease_s)
        record: ReservationRecord | None = None
        worker: WorkerRecord | None = None
        refusals: list[str] = []
        for worker in matching.candidates(self.store, req.worker, requirements, req.image):
            try:
                record = self.store.create_reservation(
                    rid=new_reservation_id(), worker_id=worker.id, client_id=client,
                    lease_s=lease, now=self._clock(), session=req.session or "",
                    image=req.image,
                    executor=matching.choose_executor(worker, requirements, req.image),
                    max_per_client=self.config.max_reservations_per_principal,
                )
                break
            except (WorkerAlreadyReserved, WorkerNotReservable, NotFound) as err:
                if req.worker is not None:
                    raise
                refusals.append(str(err))  # taken meanwhile by a racing reserve: next one
        if record is None or worker is None:
            raise Refusal("not_found", "no worker is online, free and matches "
                          f"{matching.describe(requirements, req.image)} "
                          f"({'; '.join(refusals)})")
        return self._open(record, worker, req)

    def _open(self, record: ReservationRecord, worker: WorkerRecord, req: Reserve) -> Body:
        """Ask the worker to open; ACTIVE + grant on its ok, else end and refuse."""
        wid = worker.id
        timeout = self.config.open_timeout_s
        failure: str | None = None
        detail: dict[str, Any] | None = None
        try:
            reply = self.bus.request(
                self.topics.worker_inbox(wid),
                ReservationOpen(reservation=wire.reservation(record, worker.name),
                                limits=req.limits),
                timeout=timeout,
            )
            if not isinstance(reply.body, Ok):
                failure = f"answered reservation.open with {reply.type}"
        except RequestTimeout:
            failure = f"did not confirm the reservation within {timeout:g}s"
        except RemoteError as err:
            failure = f"refused the reservation: {err}"
            detail = {"worker_code": err.code}
        except BusError as err:
            failure = f"could not be asked to open the reservation: {err}"
        if failure is not None:
            reason = f"worker {wid} {failure}"
            if self._end(record.id, reason) is None:  # something else ended it first
                current = self.store.get_reservation(record.id)
                reason = current.ended_reason if current and current.ended_reason else reason
            raise Refusal("unavailable", reason, detail)
        active = self.store.activate_reservation(record.id, self._clock())
        if active is None:
            current = self.store.get_reservation(record.id)
            why = current.ended_reason if current else "it vanished"
            raise Refusal("unavailable", f"reservation {record.id} on worker {wid} ended "
                          f"while opening: {why}")
        self._timers.arm_lease(active.id, active.expires_at)
        log.info("reservation %s: %s holds worker %s until %.0f", active.id, active.client_id,
                 wid, active.expires_at)
        return ReserveReply(reservation=wire.reservation(active, worker.name),
                            grant=self._grant(active))

    def _grant(self, record: ReservationRecord) -> str:
        return self.key.sign(rid=record.id, client=record.client_id, worker=record.worker_id,
                             exp=record.expires_at, iat=self._clock())

    # -- renew / release / list ---------------------------------------------------------

    def renew(self, incoming: Incoming) -> Body:
        req: Renew = incoming.body
        assert incoming.sender is not None
        record = self._owned(req.reservation, incoming.sender, admin_ok=False)
        if record.state != ReservationState.ACTIVE:
            raise Refusal("conflict", _not_active(record))
        renewed = self.store.renew_reservation(record.id, self._clock())
        if renewed is None:
            current = self.store.get_reservation(record.id) or record
            raise Refusal("conflict", _not_active(current))
        self._timers.arm_lease(renewed.id, renewed.expires_at)
        names = self.store.worker_names([renewed.worker_id])
        return ReserveReply(reservation=wire.reservation(renewed, names.get(renewed.worker_id)),
                            grant=self._grant(renewed))

    def release(self, incoming: Incoming) -> Body:
        req: Release = incoming.body
        sender = incoming.sender
        assert sender is not None
        record = self._owned(req.reservation, sender, admin_ok=True)
        if not record.live:
            raise Refusal("conflict", _not_active(record))
        reason = f"released by {sender}" + (f": {req.reason}" if req.reason else "")
        ended = self._end(record.id, reason, notify_holder=sender != record.client_id)
        if ended is None:
            current = self.store.get_reservation(record.id) or record
            raise Refusal("conflict", _not_active(current))
        return Ok(detail={"reservation": record.id})

    def reservations_list(self, incoming: Incoming) -> Body:
        req: ReservationsList = incoming.body
        sender = incoming.sender
        assert sender is not None
        if req.all and not self._is_admin(sender):
            raise Refusal("forbidden", "only admins may list every principal's reservations")
        records = self.store.list_reservations(
            client_id=None if req.all else sender,
            states=LIVE_STATES if req.active else None,
            limit=LIST_LIMIT,
        )
        names = self.store.worker_names(r.worker_id for r in records)
        return ReservationsListReply(
            reservations=[wire.reservation(r, names.get(r.worker_id)) for r in records])

    # -- client presence -----------------------------------------------------------------

    def client_hello(self, incoming: Incoming) -> Body:
        """A (re)connected client session: cancel its pending client.gone."""
        req: ClientHello = incoming.body
        sender = incoming.sender
        assert sender is not None
        if not req.session:
            return Ok()  # reservations without a session are not tied to a connection
        for listener in self.hello_listeners:
            listener(sender, req.session)
        self._timers.cancel_grace(sender, req.session)
        if self.store.mark_client_gone(sender, req.session, None):
            log.info("client %s session %s is back", sender, req.session)
        return Ok()

    def client_gone(self, incoming: Incoming) -> Body:
        """A client connection's last will: end its session's reservations after the grace.

        Only the sender's own reservations are touched (the broker authenticated the
        sender; the session id alone proves nothing).
        """
        req: ClientGone = incoming.body
        sender = incoming.sender
        assert sender is not None
        if not req.session:
            return Ok()
        for listener in self.gone_listeners:
            listener(sender, req.session)
        now = self._clock()
        live = self.store.mark_client_gone(sender, req.session, now)
        if live:
            log.info("client %s session %s gone; %d reservation(s) end in %gs unless it "
                     "says hello", sender, req.session, len(live), self.config.client_grace_s)
            self._timers.arm_grace(sender, req.session, now + self.config.client_grace_s)
        return Ok()

    # -- audit trail ---------------------------------------------------------------------

    def exec_report(self, incoming: Incoming) -> None:
        """Keep a worker's summary of one command; only the reservation's worker may report.

        The ``ok`` goes out only once the row is committed (the audit writer's batch): a
        worker keeps and re-sends a report until then (worker/exec_reports.py), and the
        store skips a redelivered one, so each report is recorded exactly once.
        """
        rep: ExecReport = incoming.body
        sender = incoming.sender
        assert sender is not None
        holder = self._holder(rep.reservation)
        if holder is None or holder[0] != sender:
            log.warning("dropped exec.report from %s for reservation %s: not its worker",
                        sender, rep.reservation)
            raise Refusal("forbidden", f"reservation {rep.reservation} is not on worker {sender}")
        client = holder[1]
        if rep.client != client:
            log.warning("exec.report from %s names client %s, but reservation %s is held by "
                        "%s; recording the holder", sender, rep.client, rep.reservation, client)
        self.audit.add(dict(
            reservation_id=rep.reservation, worker_id=sender, client_id=client,
            exec_id=rep.exec_id, command=rep.command, started_at=rep.started_at,
            reported_at=self._clock(), mode=rep.mode, duration_s=rep.duration_s,
            exit_code=rep.exit_code, signal=rep.signal, timed_out=rep.timed_out,
            truncated=rep.truncated, oom_killed=rep.oom_killed,
            output_bytes=rep.output_bytes, error=rep.error,
        ), on_written=lambda error: self._acknowledge(incoming, error))

    def _acknowledge(self, incoming: Incoming, error: CoordinatorError | None) -> None:
        """Answer an ``exec.report`` after its batch was (or failed to be) committed."""
        try:
            if error is None:
                self.bus.reply(incoming, Ok())
            elif isinstance(error, StoreError):
                self.bus.reply_error(incoming, "unavailable", "the audit record was not "
                                     "written (the database is down); send it again")
            else:
                self.bus.reply_error(incoming, error.code, error.wire_message())
        except Exception:
            log.exception("could not acknowledge exec.report from %s", incoming.sender)

    def _holder(self, rid: str) -> tuple[str, str] | None:
        """(worker, client) of a reservation; they never change, so they are cached."""
        found = self._holders.get(rid)
        if found is None:
            record = self.store.get_reservation(rid)
            if record is None:
                return None
            if len(self._holders) >= 10_000:
                self._holders.clear()
            found = self._holders[rid] = (record.worker_id, record.client_id)
        return found

    def audit_list(self, incoming: Incoming) -> Body:
        req: AuditList = incoming.body
        sender = incoming.sender
        assert sender is not None
        client: str | None = sender
        if self._is_admin(sender):
            client = req.client
        elif req.client is not None and req.client != sender:
            raise Refusal("forbidden", "only admins may read other principals' audit records")
        self.audit.flush()  # reports still queued are part of the answer
        records = self.store.list_exec_audit(
            client_id=client, worker_id=req.worker, reservation_id=req.reservation,
            limit=req.limit or AUDIT_DEFAULT_LIMIT,
        )
        return AuditListReply(records=[wire.audit_entry(record) for record in records])

    # -- ending ----------------------------------------------------------------------------

    def _end(self, rid: str, reason: str, *, notify_holder: bool = True,
             expired_by: float | None = None) -> ReservationRecord | None:
        """End ``rid`` if it is live; the one caller that wins tells worker and holder.

        The holder hears ``reservation.ended`` only for a reservation it knew as active
        (an OPENING one gets its error through the reserve reply instead).
        """
        result = self.store.end_reservation(rid, reason, self._clock(), expired_by=expired_by)
        if result is None:
            return None
        previous, record = result
        self._timers.cancel_lease(rid)
        self._send(self.topics.worker_inbox(record.worker_id),
                   ReservationClose(reservation=rid, reason=reason[:REASON_MAX]))
        if notify_holder and previous == ReservationState.ACTIVE:
            self._send(self.topics.client_inbox(record.client_id),
                       ReservationEnded(reservation=rid, worker=record.worker_id,
                                        reason=reason[:REASON_MAX]))
        return record

    def _send(self, base_inbox: str, body: Body) -> None:
        try:
            self.bus.send(base_inbox, body)
        except Exception:
            log.exception("could not send %s to %s", body.TYPE, base_inbox)

    def _lease_ran_out(self, rid: str) -> None:
        now = self._clock()
        if self._end(rid, REASON_EXPIRED, expired_by=now) is None:
            current = self.store.get_reservation(rid)
            if current is not None and current.state == ReservationState.ACTIVE:
                self._timers.arm_lease(rid, current.expires_at)  # renewed meanwhile

    def end_held_by(self, client: str, reason: str) -> int:
        """End every live reservation ``client`` holds (its workers drop the grants at
        once); how many ended."""
        ended = 0
        for record in self.store.list_reservations(client_id=client, states=LIVE_STATES):
            if self._end(record.id, reason) is not None:
                ended += 1
        if ended:
            log.info("ended %d reservation(s) of %s: %s", ended, client, reason)
        return ended

    def _grace_ran_out(self, client: str, session: str) -> None:
        for record in self.store.list_reservations(client_id=client, session=session,
                                                   states=LIVE_STATES, client_gone=True):
            self._end(record.id, REASON_CLIENT_GONE)

    def _on_worker_state(self, wid: str, _old: WorkerState, new: WorkerState,
                         _reason: str) -> None:
        """A lost or offline worker ends its reservation (registry thread, after commit)."""
        if new == WorkerState.LOST:
            why = REASON_WORKER_LOST
        elif new == WorkerState.OFFLINE:
            why = REASON_WORKER_OFFLINE
        else:
            return
        record = self.store.reservation_of_worker(wid)
        if record is not None:
            self._end(record.id, why)


def _not_active(record: ReservationRecord) -> str:
    if record.state == ReservationState.OPENING:
        return f"reservation {record.id} is still opening"
    if record.state == ReservationState.ENDED:
        return f"reservation {record.id} has ended ({record.ended_reason or 'no reason'})"
    return f"reservation {record.id} is {record.state.value}"
