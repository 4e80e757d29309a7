"""Reservations: one client's leased hold on one worker (``coordinator.reservation_state``).

The database decides races: ``xc_reservation.active_worker`` is UNIQUE (one holder per
worker) and every end is a conditional update (one winner among lease expiry, worker
lost and release). The timers and messages around them live in
``coordinator.reservations``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peewee import IntegrityError

from coordinator.errors import AlreadyExists, InvalidArgument, NotFound
from coordinator.models import ID_MAX, IMAGE_MAX, RID_MAX, SHORT_MAX
from coordinator.reservation_state import (
    LIVE_STATES,
    ReservationLimitReached,
    ReservationState,
    WorkerAlreadyReserved,
    WorkerNotReservable,
    sources_of,
)
from coordinator.store.engine import op
from coordinator.store.values import as_float, checked_text, dicts, tuples
from coordinator.store.workers import WorkerStore
from coordinator.worker_state import WorkerState

log = logging.getLogger(__name__)

REASON_MAX = 1024  # ended_reason on the wire
_LIVE_VALUES = [s.value for s in LIVE_STATES]


@dataclass(frozen=True, slots=True)
class ReservationRecord:
    """A reservation as stored (see ``coordinator.reservation_state``)."""

    id: str
    worker_id: str
    client_id: str
    session: str
    state: ReservationState
    created_at: float
    expires_at: float
    lease_s: float
    ended_at: float | None
    ended_reason: str
    image: str | None
    executor: str | None
    client_gone_at: float | None

    @property
    def live(self) -> bool:
        """True while it holds its worker (opening or active)."""
        return self.state.is_live


def _reservation_record(row: dict[str, Any]) -> ReservationRecord:
    return ReservationRecord(
        id=row["id"],
        worker_id=row["worker_id"],
        client_id=row["client_id"],
        session=row["session"] or "",
        state=ReservationState(row["state"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        lease_s=row["lease_s"],
        ended_at=row["ended_at"],
        ended_reason=row["ended_reason"] or "",
        image=row["image"],
        executor=row["executor"],
        client_gone_at=row["client_gone_at"],
    )


def _values(states: Iterable[ReservationState]) -> list[str]:
    return sorted(ReservationState(s).value for s in states)


class ReservationStore(WorkerStore):
    """Reservation rows; a worker store too, since a reservation locks its worker's row."""

    @op
    def create_reservation(
        self,
        *,
        rid: str,
        worker_id: str,
        client_id: str,
        lease_s: float,
        now: float,
        session: str = "",
        image: str | None = None,
        executor: str | None = None,
        max_per_client: int = 1,
        worker_states: Iterable[WorkerState] = (WorkerState.ONLINE,),
    ) -> ReservationRecord:
        """Record a reservation in state OPENING, or refuse it; nothing changes on refusal.

        In one transaction: the worker must exist (NotFound) and be in ``worker_states``
        (WorkerNotReservable; its row is locked, so a concurrent state change lands
        either before this check or after the insert, where the state listener sees the
        reservation); the client must hold fewer than ``max_per_client`` live
        reservations (ReservationLimitReached; 0 = no limit); the insert fills the unique
        ``active_worker``, so of racing requests for one worker exactly one commits and
        the others get WorkerAlreadyReserved.
        """
        checked_text(rid, "reservation id", RID_MAX)
        checked_text(worker_id, "worker id", ID_MAX)
        checked_text(client_id, "client id", ID_MAX)
        if not isinstance(session, str) or len(session) > ID_MAX:
            raise InvalidArgument(f"session must be a string of at most {ID_MAX} characters")
        if image is not None:
            checked_text(image, "image", IMAGE_MAX)
        if executor is not None:
            checked_text(executor, "executor", SHORT_MAX)
        lease = as_float(lease_s)
        if lease is None or lease <= 0:
            raise InvalidArgument(f"lease must be a positive number of seconds, got {lease_s!r}")
        allowed = {WorkerState(s).value for s in worker_states}
        row = {
            "id": rid,
            "worker_id": worker_id,
            "client_id": client_id,
            "session": session,
            "state": ReservationState.OPENING.value,
            "created_at": now,
            "expires_at": now + lease,
            "lease_s": lease,
            "ended_at": None,
            "ended_reason": "",
            "image": image,
            "executor": executor,
            "active_worker": worker_id,
            "client_gone_at": None,
        }
        Principal = self.models.Principal
        Reservation = self.models.Reservation
        try:
            with self.db.atomic():
                # MySQL: one reserve at a time per client, so the limit holds under races
                # (SQLite's BEGIN IMMEDIATE already serialises every writer).
                list(self._for_update(Principal.select(Principal.id).where(
                    Principal.id == client_id)).tuples())
                worker = self._locked_worker(worker_id)
                if worker is None:
                    raise NotFound(f"no worker with id or name {worker_id!r}")
                if worker["state"] not in allowed:
                    raise WorkerNotReservable(worker_id, worker["state"])
                if max_per_client > 0:
                    held = tuples(
                        Reservation.select(Reservation.id, Reservation.worker_id)
                        .where((Reservation.client_id == client_id)
                               & Reservation.state.in_(_LIVE_VALUES))
                        .order_by(Reservation.created_at)
                    )
                    if len(held) >= max_per_client:
                        raise ReservationLimitReached(client_id, [(r, w) for r, w in held])
                Reservation.insert(row).execute()
        except IntegrityError:
            if Reservation.get_or_none(Reservation.id == rid) is not None:
                raise AlreadyExists(f"reservation id {rid!r} is taken") from None
            raise WorkerAlreadyReserved(worker_id) from None
        log.info("reservation %s: %s reserves worker %s (opening)", rid, client_id, worker_id)
        row.pop("active_worker")
        return _reservation_record(row)

    def _reservation(self, rid: str) -> ReservationRecord | None:
        Reservation = self.models.Reservation
        rows = dicts(Reservation.select().where(Reservation.id == rid))
        return _reservation_record(rows[0]) if rows else None

    @op
    def get_reservation(self, rid: str) -> ReservationRecord | None:
        """The reservation with this id, live or ended; None if unknown."""
        return self._reservation(rid)

    @op
    def activate_reservation(self, rid: str, now: float) -> ReservationRecord | None:
        """OPENING -> ACTIVE with the lease starting ``now``; None if it was not opening."""
        Reservation = self.models.Reservation
        with self.db.atomic():
            changed = (
                Reservation.update(state=ReservationState.ACTIVE.value,
                                   expires_at=Reservation.lease_s + now)
                .where((Reservation.id == rid)
                       & Reservation.state.in_(_values(sources_of(ReservationState.ACTIVE))))
                .execute()
            )
            return self._reservation(rid) if changed else None

    @op
    def renew_reservation(self, rid: str, now: float) -> ReservationRecord | None:
        """Extend an ACTIVE lease to ``now + lease_s``; None if it is not active.

        A renewal proves the holder is alive, so it also clears a pending client.gone.
        """
        Reservation = self.models.Reservation
        with self.db.atomic():
            changed = (
                Reservation.update(expires_at=Reservation.lease_s + now, client_gone_at=None)
                .where((Reservation.id == rid)
                       & (Reservation.state == ReservationState.ACTIVE.value))
                .execute()
            )
            return self._reservation(rid) if changed else None

    @op
    def end_reservation(
        self, rid: str, reason: str, now: float, *, expired_by: float | None = None
    ) -> tuple[ReservationState, ReservationRecord] | None:
        """End a live reservation and free its worker: ``(previous state, ended record)``.

        None when it was not live (or, with ``expired_by``, when its lease had not run out
        by then: a renewal that won the race keeps it). The row is locked and the update
        conditional, so when several causes race (lease, worker lost, release) exactly one
        call gets the record back, and only that caller notifies anyone.
        """
        Reservation = self.models.Reservation
        live = _values(sources_of(ReservationState.ENDED))
        with self.db.atomic():
            query = Reservation.select(Reservation.state, Reservation.expires_at).where(
                Reservation.id == rid)
            rows = tuples(self._for_update(query))
            if not rows or rows[0][0] not in live:
                return None
            if expired_by is not None and rows[0][1] > expired_by:
                return None
            Reservation.update(
                state=ReservationState.ENDED.value, ended_at=now,
                ended_reason=(reason or "ended")[:REASON_MAX], active_worker=None,
                client_gone_at=None,
            ).where((Reservation.id == rid) & Reservation.state.in_(live)).execute()
            record = self._reservation(rid)
        assert record is not None
        log.info("reservation %s on %s ended: %s", rid, record.worker_id, reason)
        return ReservationState(rows[0][0]), record

    @op
    def list_reservations(
        self,
        *,
        client_id: str | None = None,
        worker_id: str | None = None,
        session: str | None = None,
        states: Iterable[ReservationState] | None = None,
        client_gone: bool | None = None,
        limit: int | None = None,
    ) -> list[ReservationRecord]:
        """Reservations matching every given filter, newest first."""
        Reservation = self.models.Reservation
        query = Reservation.select().order_by(Reservation.created_at.desc(),
                                              Reservation.id.desc())
        if client_id is not None:
            query = query.where(Reservation.client_id == client_id)
        if worker_id is not None:
            query = query.where(Reservation.worker_id == worker_id)
        if session is not None:
            query = query.where(Reservation.session == session)
        if states is not None:
            query = query.where(Reservation.state.in_(_values(states)))
        if client_gone is not None:
            gone = Reservation.client_gone_at.is_null(False)
            query = query.where(gone if client_gone else ~gone)
        if limit is not None:
            query = query.limit(max(0, limit))
        return [_reservation_record(row) for row in dicts(query)]

    @op
    def reservation_of_worker(self, wid: str) -> ReservationRecord | None:
        """The live reservation holding ``wid``, if any."""
        Reservation = self.models.Reservation
        rows = dicts(Reservation.select().where(Reservation.active_worker == wid))
        return _reservation_record(rows[0]) if rows else None

    @op
    def stale_sessions(self, wid: str, rids: Iterable[str]) -> dict[str, str]:
        """Of the reservation sessions worker ``wid`` says it holds, those it must not
        (unknown, ended, or held on another worker), each with the reason to tell it.

        One query whatever the number of ids (the reconciler runs this per heartbeat).
        """
        wanted = sorted({rid for rid in rids if isinstance(rid, str)})
        if not wanted:
            return {}
        Reservation = self.models.Reservation
        query = Reservation.select(Reservation.id, Reservation.worker_id, Reservation.state,
                                   Reservation.ended_reason).where(Reservation.id.in_(wanted))
        known = {rid: (worker, state, reason) for rid, worker, state, reason in tuples(query)}
        stale: dict[str, str] = {}
        for rid in wanted:
            found = known.get(rid)
            if found is None:
                stale[rid] = "not reserved"
            elif found[0] != wid:
                stale[rid] = f"reservation {rid} is not on worker {wid}"
            elif found[1] == ReservationState.ENDED.value:
                stale[rid] = found[2] or "ended"
        return stale

    @op
    def reserved_worker_ids(self) -> set[str]:
        """Ids of the workers held by a live reservation."""
        return {wid for (wid,) in self._sql.tuples(
            "SELECT {active_worker} FROM {reservations} WHERE {active_worker} IS NOT NULL")}

    @op
    def mark_client_gone(
        self, client_id: str, session: str, at: float | None
    ) -> list[ReservationRecord]:
        """Note (``at``) or clear (None) a client.gone on the live reservations of a session.

        Persisted so that a restarted coordinator rebuilds the grace timers. Returns the
        live reservations of that client session.
        """
        Reservation = self.models.Reservation
        live = (Reservation.client_id == client_id) & (Reservation.session == session) & (
            Reservation.state.in_(_LIVE_VALUES))
        with self.db.atomic():
            Reservation.update(client_gone_at=at).where(live).execute()
            rows = dicts(Reservation.select().where(live).order_by(Reservation.created_at))
        return [_reservation_record(row) for row in rows]
