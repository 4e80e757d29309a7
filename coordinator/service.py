"""The coordinator daemon: wires the bus, the store, the registry and request handlers.

Everything is passed in (config, store, optionally a bus); nothing connects at import
time. The grant key is loaded (or created) from ``<data_dir>/grant_key.pem`` at
construction. ``Coordinator.start`` returns once subscribed; ``stop`` publishes a clean
``coord.status down`` and flushes pending heartbeats.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from broker.acl import Role
from broker.bus import Bus, Incoming, Lane, Will
from broker.config import Config
from coordinator.admin import AdminHandlers
from coordinator.app_requests import AppRequests
from coordinator.data_service import DataService
from coordinator.forget import WorkerForgetting
from coordinator.handling import RequestGuard, guarded
from coordinator.job_requests import JobRequests
from coordinator.keys import GrantKey, load_or_create_grant_key
from coordinator.monitoring.service import MonitoringService
from coordinator.reconcile import SessionReconciler
from coordinator.registry import WorkerRegistry
from coordinator.requests import VERSION, RequestHandlers
from coordinator.reservations import REASON_REVOKED, ReservationService
from coordinator.scheduler import JobScheduler
from coordinator.store import Store
from schemas.codec import envelope
from schemas.messages import (
    CapsRefresh,
    ClientAccepts,
    CoordStatus,
    WorkerCaps,
    WorkerEvent,
    WorkerHeartbeat,
    WorkersDrain,
    WorkerStatus,
)
from schemas.topics import Topics

if TYPE_CHECKING:
    from coordinator.http.server import DashboardServer

log = logging.getLogger(__name__)


class Coordinator:
    """One coordinator process's worth of services."""

    def __init__(self, config: Config, store: Store, bus: Bus | None = None,
                 grant_key: GrantKey | None = None) -> None:
        self.config = config
        self.store = store
        self.topics = Topics(config.bus.root)
        self.principal = config.bus.principal or "coordinator"
        self.started_at = time.time()
        self.bus = bus or Bus(
            config.bus,
            client_id=f"coordinator-{self.principal}",
            inbox=self.topics.coord_inbox,
            will=Will(self.topics.coord_status,
                      CoordStatus(state="down", clean=False, principal=self.principal)),
            persistent_session=True,
        )
        self.registry = WorkerRegistry(
            store,
            self.topics,
            liveness_factor=config.coordinator.liveness_factor,
            default_interval=config.coordinator.default_heartbeat_s,
            flush_s=config.coordinator.heartbeat_flush_s,
            publish_event=self._publish_event,
            request_caps=self._request_caps,
            is_connected=self.bus.connected.is_set,
            backlog=lambda: self.bus.backlog(Lane.HEARTBEAT),
            link=self.bus.link_state,
            will_confirm_s=config.coordinator.will_confirm_s,
            reconnect_grace_s=config.coordinator.reconnect_grace_s,
        )
        # Every request is admitted by this guard first (role table, revocation, rates).
        self.guard = RequestGuard(store, config.coordinator, anonymous_role=(
            Role.CLIENT if config.broker.allow_anonymous else None))
        self.guard.install(self.bus)
        # Data objects over the transfer protocol (docs/data.md): its endpoint must exist
        # before the bus starts.
        self.data = DataService(self.bus, store, config, self.guard)
        # Applications (docs/data.md, "Applications"): their files are data objects.
        self.apps = AppRequests(self.bus, store, self.guard, self.data.source)
        self.requests = RequestHandlers(self.bus, store, self.registry)
        self.admin = AdminHandlers(self.bus, store, self.topics, own_principal=self.principal,
                                   max_payload=config.bus.max_payload,
                                   principal_changed=self.guard.forget,
                                   principal_revoked=self._end_reservations_of)
        self.grant_key = grant_key or load_or_create_grant_key(config.data_dir)
        self.reservations = ReservationService(self.bus, store, self.registry,
                                               config.coordinator, self.grant_key,
                                               topics=self.topics)
        self.reconciler = SessionReconciler(self.bus, store, self.topics)
        self.registry.heartbeat_listeners.append(self.reconciler.on_heartbeat)
        # Monitoring (docs/monitoring.md): time series, /metrics, the dashboard.
        self.monitoring = MonitoringService(
            config.monitoring, store, heartbeats_total=lambda: self.registry.heartbeats_ingested)
        self.registry.heartbeat_listeners.append(self.monitoring.running.on_heartbeat)
        self.dashboard = self._dashboard() if config.monitoring.http else None
        # Batch jobs (docs/jobs.md): the scheduler, the requests, and the data rights of
        # workers (they read their attempts' inputs and store their results).
        self.scheduler = JobScheduler(self.bus, store, self.registry, config.jobs, self.topics)
        self.jobs = JobRequests(self.bus, store, self.guard, self.scheduler,
                                max_payload=config.bus.max_payload, data_sink=self.data.sink)
        self.data.source.worker_may_read = store.worker_may_read
        self.data.sink.attempt_grant = store.attempt_grant

    def _end_reservations_of(self, principal: str) -> None:
        self.reservations.end_held_by(principal, REASON_REVOKED)

    def start(self, wait: bool = True) -> None:
        if self.dashboard is not None:
            self.dashboard.start()  # first: a taken port fails before anything else runs
        self.monitoring.start()
        self.registry.start()
        self.reservations.start()  # before the bus: it must see every worker state change
        self.scheduler.start()  # likewise
        self.bus.subscribe(self.topics.all_worker_caps, self.registry.on_caps, lane=Lane.REGISTRY,
                           types=(WorkerCaps.TYPE,))
        self.bus.subscribe(self.topics.all_worker_status, self.registry.on_status,
                           lane=Lane.REGISTRY, types=(WorkerStatus.TYPE,))
        self.bus.subscribe(self.topics.all_worker_heartbeat, self.registry.on_heartbeat,
                           qos=0, lane=Lane.HEARTBEAT, types=(WorkerHeartbeat.TYPE,))
        self.requests.register()
        self.admin.register()
        WorkerForgetting(self.bus, self.store, self.topics).register()
        self.reservations.register()
        # client.accepts shares the lane of client.hello and client.gone (their order)
        self.bus.on_inbox(ClientAccepts.TYPE,
                          guarded(self.bus, self.scheduler.events.client_accepts),
                          lane=Lane.RESERVATIONS)
        self.reservations.hello_listeners.append(self.scheduler.events.client_hello)
        self.reservations.gone_listeners.append(self.scheduler.events.client_gone)
        self.data.register()
        self.jobs.register()
        self.apps.register()
        self.data.start()
        self.bus.on_connected(self.registry.on_bus_connected)
        self.bus.on_connected(self._announce)
        self.bus.start(wait=wait)
        log.info("coordinator %s up on %s (root %s, db %s)", self.principal,
                 self.config.bus.url, self.topics.root, self.config.db_url.split("@")[-1])

    def stop(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
        self.monitoring.stop()
        self.reservations.stop()
        self.scheduler.stop()
        self.data.stop()
        self.bus.stop(publish=[(self.topics.coord_status,
                                CoordStatus(state="down", clean=True, version=VERSION,
                                            principal=self.principal), 1, True)])
        self.reservations.join()
        self.scheduler.join()
        self.registry.stop()

    def _announce(self) -> None:
        self.bus.publish(self.topics.coord_status,
                         CoordStatus(state="up", clean=True, version=VERSION,
                                     started_at=self.started_at, principal=self.principal),
                         retain=True)
        self.reservations.announce()

    def _publish_event(self, event: WorkerEvent) -> None:
        self.bus.publish(self.topics.event("worker", event.wid), event, qos=0)

    def _request_caps(self, wid: str, body: CapsRefresh) -> None:
        self.bus.send(self.topics.worker_inbox(wid), body)

    def _dashboard(self) -> DashboardServer:
        from coordinator.http.api import DashboardContext
        from coordinator.http.server import DashboardServer

        return DashboardServer(DashboardContext(
            store=self.store, config=self.config.monitoring, monitoring=self.monitoring,
            drain=self._drain_from_dashboard, flush_audit=self.reservations.audit.flush,
            grid=self.topics.root, coordinator=self.principal, version=VERSION,
            object_path=self.data.files.object_path, bus=self.bus))

    def _drain_from_dashboard(self, principal: str, wid: str, drain: bool) -> dict[str, Any]:
        """A drain asked on the dashboard, decided by the ``workers.drain`` handler itself."""
        incoming = Incoming(topic=self.topics.coord_inbox, sender=principal,
                            message=envelope(WorkersDrain(worker=wid, drain=drain)))
        reply = self.requests.workers_drain(incoming)
        return dict(getattr(reply, "detail", None) or {})
