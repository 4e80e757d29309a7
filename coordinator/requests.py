"""Handlers for requests arriving in the coordinator's inbox.

Each handler gets a validated, typed message whose sender the broker authenticated, and
answers with exactly one reply (a result or an ``error``). Domain errors become error
replies with a stable code; nothing a client sends can crash the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.bus import Bus, Incoming, Lane
from coordinator import wire
from coordinator.errors import NotFound
from coordinator.handling import Refusal, guarded
from coordinator.registry import WorkerRegistry
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from schemas.messages import (
    Body,
    Ok,
    Pong,
    WorkersDrain,
    WorkersList,
    WorkersListReply,
    WorkersShow,
    WorkersShowReply,
)
from schemas.version import __version__

log = logging.getLogger(__name__)

VERSION = __version__
SHOW_EVENTS = 20  # latest transitions in workers.show.reply (the schema allows 32)
REPLY_OVERHEAD = 1024  # bytes of a reply besides its rows (envelope, keys)


class RequestHandlers:
    """Binds request types to methods; ``register`` puts them on the bus."""

    def __init__(self, bus: Bus, store: Store, registry: WorkerRegistry) -> None:
        self.bus = bus
        self.store = store
        self.registry = registry

    def register(self) -> None:
        table: dict[str, Callable[[Incoming], Body]] = {
            "ping": self.ping,
            "workers.list": self.workers_list,
            "workers.show": self.workers_show,
            "workers.drain": self.workers_drain,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, guarded(self.bus, fn), lane=Lane.REQUESTS)

    # -- handlers ---------------------------------------------------------------------

    def ping(self, incoming: Incoming) -> Body:
        return Pong(component="coordinator", version=VERSION, principal=incoming.sender)

    def workers_list(self, incoming: Incoming) -> Body:
        req: WorkersList = incoming.body
        states = [WorkerState(s) for s in req.state] if req.state else None
        records = self.store.list_workers(
            state=states, tags=req.tags or [], min_cpus=req.min_cpus,
            min_memory_bytes=req.min_memory_bytes, name=req.name,
        )
        rows, more = wire.workers_list(records, self.bus.config.max_payload - REPLY_OVERHEAD)
        if more:
            log.info("workers.list for %s cut at %d workers to fit one message",
                     incoming.sender, len(rows))
        return WorkersListReply(workers=rows, more=True if more else None)

    def workers_show(self, incoming: Incoming) -> Body:
        req: WorkersShow = incoming.body
        record = self.store.get_worker(req.worker)
        if record is None:
            raise NotFound(f"no worker with id or name {req.worker!r}")
        events = self.store.worker_events(record.id, SHOW_EVENTS)
        detail = wire.worker_detail(record, events)
        detail["trust"] = self.store.worker_trust(record.id).as_dict()  # job_replicas.py
        return WorkersShowReply(worker=detail)

    def workers_drain(self, incoming: Incoming) -> Body:
        """Admin: stop giving a worker new work (drain) or resume. A drain survives the
        worker's reconnects; only an admin (or the worker's own status) lifts it."""
        req: WorkersDrain = incoming.body
        sender = incoming.sender or ""
        principal = self.store.get_principal(sender)
        if principal is None or principal.role != "admin":
            raise Refusal("forbidden", f"{sender} is not an admin")
        record = self.store.get_worker(req.worker)
        if record is None:
            raise NotFound(f"no worker with id or name {req.worker!r}")
        if record.state not in (WorkerState.ONLINE, WorkerState.DRAINING):
            raise Refusal("invalid", f"worker {record.id} is {record.state.value}, not running")
        target = WorkerState.DRAINING if req.drain else WorkerState.ONLINE
        verb = "drained" if req.drain else "undrained"
        self.registry.set_state(record.id, target, f"{verb} by {sender}")
        return Ok(detail={"worker": record.id, "state": target.value})
