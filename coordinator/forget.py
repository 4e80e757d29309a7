"""``workers.forget``: an admin removes a worker that is gone for good.

A worker that was lost or went offline stays in the listing forever (its row is the
memory of what it was). ``xcloud admin forget WORKER`` deletes that row and clears the
worker's retained status and caps on the broker, so that a restarted coordinator does
not bring it back from them. Only lost and offline workers can be forgotten, and none
that a live reservation still names; if the machine comes back later it simply joins
afresh. Its heartbeat samples and state events stay (they are history).
"""

from __future__ import annotations

import logging

from broker.bus import Bus, Incoming, Lane
from coordinator.handling import Refusal, guarded
from coordinator.store import Store
from coordinator.store.engine import op
from coordinator.worker_state import WorkerState
from schemas.messages import Body, Ok, WorkersForget
from schemas.topics import Topics

log = logging.getLogger(__name__)

FORGETTABLE = (WorkerState.LOST, WorkerState.OFFLINE)


@op
def _delete_if_gone(store: Store, wid: str) -> bool:
    """Delete ``wid``'s row if it is still lost or offline (one conditional statement,
    so a worker that came back meanwhile is kept); True when it was deleted."""
    Worker = store.models.Worker
    states = [s.value for s in FORGETTABLE]
    deleted: int = Worker.delete().where((Worker.id == wid) & (Worker.state.in_(states))
                                         ).execute()
    return deleted > 0


class WorkerForgetting:
    """Serves ``workers.forget`` (admins only) on ``Lane.ADMIN``."""

    def __init__(self, bus: Bus, store: Store, topics: Topics) -> None:
        self.bus = bus
        self.store = store
        self.topics = topics

    def register(self) -> None:
        self.bus.on_inbox(WorkersForget.TYPE, guarded(self.bus, self.forget), lane=Lane.ADMIN)

    def forget(self, incoming: Incoming) -> Body:
        req: WorkersForget = incoming.body
        sender = incoming.sender or ""
        principal = self.store.get_principal(sender)
        if principal is None or principal.revoked or principal.role != "admin":
            raise Refusal("forbidden", f"{sender} is not an admin")
        record = self.store.get_worker(req.worker)
        if record is None:
            raise Refusal("not_found", f"no worker with id or name {req.worker!r}")
        if record.state not in FORGETTABLE:
            raise Refusal("conflict", f"worker {record.id} is {record.state.value}; only a "
                          "lost or offline worker can be forgotten (stop it first)")
        held = self.store.reservation_of_worker(record.id)
        if held is not None:
            raise Refusal("conflict", f"worker {record.id} is still held by reservation "
                          f"{held.id}; wait until it ends")
        if not _delete_if_gone(self.store, record.id):
            raise Refusal("conflict", f"worker {record.id} came back meanwhile; not forgotten")
        for topic in (self.topics.worker_status(record.id), self.topics.worker_caps(record.id)):
            self.bus.publish_bytes(topic, b"", qos=1, retain=True)  # clears the retained one
        log.info("worker %s forgotten by %s (it was %s)", record.id, sender,
                 record.state.value)
        return Ok(detail={"worker": record.id})
