"""The worker agent: joins the grid, advertises itself, heartbeats, leaves cleanly.

What it publishes (see docs/worker.md):

- ``{root}/worker/{wid}/caps``      worker.caps, retained, QoS 1, after every (re)connect
- ``{root}/worker/{wid}/status``    worker.status, retained, QoS 1: online / draining on
  (re)connect and on drain(), offline clean=True on stop(); the broker publishes the last
  will (offline clean=False) when the connection dies
- ``{root}/worker/{wid}/heartbeat`` worker.heartbeat, QoS 0, every ``heartbeat_s``

Republishing on every (re)connect is what heals a broker or coordinator restart without
anyone asking (invariant 5). Nothing here connects at import; the agent gets its config
(and, in tests, a ready Bus) passed in explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.bus import Bus, Incoming, Lane, Will
from broker.config import Config
from broker.transfer import Peer, TransferEndpoint
from schemas.codec import encode, envelope
from schemas.errors import WireError
from schemas.messages import CapsRefresh, Ok, Ping, Pong, WorkerCaps, WorkerStatus
from schemas.topics import Topics
from schemas.version import __version__
from worker.caps import collect_caps
from worker.errors import WorkerError
from worker.exec_service import ExecService
from worker.executors import fingerprint, make_executor
from worker.executors.base import Executor, ExecutorContext
from worker.file_transfers import WorkdirFiles
from worker.identity import Identity, explicit_bus_identity, load_identity
from worker.input_cache import InputCache
from worker.job_runner import JobRunner
from worker.metrics import MetricsSampler
from worker.request_guard import WorkerRequestGuard
from worker.settings import effective_settings
from worker.workdir_fetch import WorkdirDataFetch

log = logging.getLogger(__name__)

AGENT_VERSION = __version__
DEFAULT_EXECUTORS: tuple[str, ...] = ("process",)

#: Returns (what is running as [{"kind": ..., "id": ...}], free slots).
RunningProvider = Callable[[], tuple[list[dict[str, str]], int]]


def build_bus(config: Config, wid: str, token: str) -> Bus:
    """The worker's Bus: stable client id, own inbox, persistent session, last will."""
    topics = Topics(config.bus.root)
    bus_cfg = dataclasses.replace(config.bus, principal=wid, token=token)
    will = Will(
        topics.worker_status(wid),
        WorkerStatus(wid=wid, state="offline", clean=False, reason="connection lost"),
        qos=1,
        retain=True,
    )
    return Bus(
        bus_cfg,
        client_id=f"worker-{wid}",
        inbox=topics.worker_inbox(wid),
        will=will,
        persistent_session=True,
    )


class WorkerAgent:
    """One worker on the grid.

    ``start()`` loads the identity, connects (building the Bus unless one was given)
    and starts heartbeating; ``stop()`` says goodbye and joins every thread it started.
    A given Bus must have been built for this worker (see ``build_bus``); the agent
    registers its handlers on it and stops it in ``stop()``.
    """

    def __init__(
        self,
        config: Config,
        *,
        bus: Bus | None = None,
        executors: Sequence[str] | None = None,
        running: RunningProvider | None = None,
        state_dir: Path | str | None = None,
        remote_exec: bool = True,
    ) -> None:
        self.config = config
        self.topics = Topics(config.bus.root)
        self.state_dir = Path(state_dir) if state_dir is not None else config.worker_state_dir
        self.executors = list(executors if executors is not None
                              else [config.worker.executor or DEFAULT_EXECUTORS[0]])
        self.remote_exec = remote_exec
        self.exec_service: ExecService | None = None
        # Files on a reservation (put/get, xcloud cp): worker/file_transfers.py.
        self.transfers: TransferEndpoint | None = None
        self.guard: WorkerRequestGuard | None = None  # roles and rate limits of the inbox
        self.executor: Executor | None = None
        # Batch jobs (worker/job_runner.py) and their input cache (worker/input_cache.py).
        self.jobs: JobRunner | None = None
        self.cache: InputCache | None = None
        # Data objects placed in a reservation's work dir (worker/workdir_fetch.py).
        self.data_fetch: WorkdirDataFetch | None = None
        self._job_executors: dict[str, Executor] = {}
        self._job_executors_lock = threading.Lock()
        self.heartbeat_s = float(config.worker.heartbeat_s)
        if self.heartbeat_s <= 0:
            raise WorkerError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        self._given_bus = bus
        self._bus: Bus | None = None
        self._running: RunningProvider = running or self._nothing_running
        self._wid = ""
        self._identity: Identity | None = None
        self._state = "online"
        self._caps: WorkerCaps | None = None
        self._sampler: MetricsSampler | None = None
        self._seq = 0
        self._lock = threading.Lock()  # orders status publications and state changes
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._started = False
        self.stopped = threading.Event()

    # -- properties ----------------------------------------------------------------

    @property
    def wid(self) -> str:
        if not self._wid:
            raise WorkerError("the worker has not been started")
        return self._wid

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise WorkerError("the worker has not been started")
        return self._bus

    @property
    def state(self) -> str:
        """``online`` or ``draining`` while running; ``offline`` once stopped."""
        return "offline" if self.stopped.is_set() else self._state

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected.is_set()

    @property
    def caps(self) -> WorkerCaps | None:
        """The capability document last collected (and published when connected)."""
        return self._caps

    @property
    def heartbeats_sent(self) -> int:
        return self._seq

    def set_running_provider(self, provider: RunningProvider) -> None:
        """Let the exec/job machinery report what runs and how many slots are free."""
        self._running = provider

    def _nothing_running(self) -> tuple[list[dict[str, str]], int]:
        return [], self.config.worker.slots

    # -- lifecycle -----------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Join the grid.

        With ``wait`` block until the broker accepted us (BusError otherwise); without,
        return at once and let the bus keep retrying in the background. Raises
        IdentityError when there is no identity, WorkerError for a configuration that
        would produce an invalid capability document.
        """
        if self._started:
            return
        identity = load_identity(self.state_dir, explicit_bus_identity(self.config))
        wid, token = identity.wid, identity.token
        self._identity = identity
        # name, description, tags, slots: as given, else as the last run saved them
        self.config = dataclasses.replace(
            self.config, worker=effective_settings(self.config, self.state_dir))
        self._wid = wid
        self._sampler = MetricsSampler(wid, self.state_dir)
        self._collect_caps()  # fail fast on a bad config, before touching the network
        if self._given_bus is not None:
            bus = self._given_bus
            if bus.inbox != self.topics.worker_inbox(wid):
                raise WorkerError(
                    f"the given bus has inbox {bus.inbox!r}, not worker {wid}'s inbox"
                )
        else:
            bus = build_bus(self.config, wid, token)
        self._bus = bus
        guard = self.guard = WorkerRequestGuard(bus, self.config.worker)
        bus.on_inbox(CapsRefresh.TYPE, guard.wrap(self._on_caps_refresh))
        # Answered on the inbox lane itself: no flood of other requests delays a ping.
        bus.on_inbox(Ping.TYPE, guard.wrap(self._on_ping), lane=Lane.INBOX)
        if self.remote_exec:
            self._start_exec(bus, wid)
        bus.on_connected(self._on_connected)
        self._started = True
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"worker-{wid}-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()
        log.info("worker %s joining the grid at %s", wid, self.config.bus.url)
        try:
            bus.start(wait=wait, timeout=timeout)
        except BaseException:
            self._stop.set()
            self._wake.set()
            self._heartbeat_thread.join(5)
            if self.jobs is not None:
                self.jobs.close()
            if self.transfers is not None:
                self.transfers.close()
            if self.data_fetch is not None:
                self.data_fetch.close()
            bus.stop()
            self.stopped.set()
            raise

    def stop(self, reason: str = "stopped") -> None:
        """Leave cleanly: retained status offline (clean=True), then disconnect."""
        if not self._started or self.stopped.is_set():
            return
        with self._lock:
            self._stop.set()
        self._wake.set()
        if self._heartbeat_thread is not None and self._heartbeat_thread is not (
            threading.current_thread()
        ):
            self._heartbeat_thread.join(5)
        if self.jobs is not None:
            self.jobs.close()  # running jobs stop; finished ones' reports stay on disk
        if self.transfers is not None:
            self.transfers.close()  # unfinished uploads stay resumable
        if self.data_fetch is not None:
            self.data_fetch.close()  # after the transfers: their downloads end at once
        if self.exec_service is not None:
            self.exec_service.close()  # last exits and reports still go out
        bye = WorkerStatus(wid=self.wid, state="offline", clean=True, reason=reason)
        self.bus.stop(publish=[(self.topics.worker_status(self.wid), bye, 1, True)])
        if self.executor is not None:
            self.executor.close()
        for extra in self._job_executors.values():
            if extra is not self.executor:
                extra.close()
        self.stopped.set()
        log.info("worker %s stopped (%s)", self.wid, reason)

    def _start_exec(self, bus: Bus, wid: str) -> None:
        """Reservations and remote commands on the first configured executor."""
        name = self.executors[0]
        self.executor = make_executor(name, ExecutorContext(self.config.worker, self.state_dir,
                                                            wid))
        self.exec_service = ExecService(bus, self.topics, wid, self.config.worker,
                                        self.executor, self.state_dir, guard=self.guard)
        self.exec_service.register()
        # Before bus.start(): the endpoint registers its handlers and subscription.
        files = WorkdirFiles(wid, self.exec_service.key, self.exec_service.session,
                             self.exec_service.store, guard=self.guard)
        self.transfers = TransferEndpoint(bus, sink=files, source=files)
        if self._running == self._nothing_running:
            self._running = self.exec_service.running
        self._start_jobs(bus, wid)
        assert self.cache is not None
        assert self.guard is not None
        coordinator = Peer.coordinator(self.topics,
                                       self.config.worker.coordinator_principal
                                       or "coordinator")
        self.data_fetch = WorkdirDataFetch(bus, files, self.cache, coordinator,
                                           caps_changed=self._caps_changed)
        self.data_fetch.register(self.guard)

    def _start_jobs(self, bus: Bus, wid: str) -> None:
        """Batch jobs: the input cache and the job runner (docs/jobs.md)."""
        assert self.transfers is not None
        assert self.exec_service is not None
        cfg = self.config.worker
        transfers = self.transfers

        def fetch(sha256: str, dest: Path) -> None:
            peer = Peer.coordinator(self.topics, cfg.coordinator_principal or "coordinator")
            transfers.download(peer, {"kind": "data", "sha256": sha256}, dest,
                               expected_sha256=sha256)

        self.cache = InputCache(Path(cfg.cache_dir) if cfg.cache_dir
                                else self.state_dir / "cache", cfg.cache_bytes, fetch)
        exec_service = self.exec_service
        self.jobs = JobRunner(
            bus, self.topics, wid, cfg, self.state_dir, executor_for=self._job_executor,
            executors=self.executors, transfers=transfers, cache=self.cache,
            guard=self.guard, used_slots=lambda: len(exec_service.sessions.all()),
            caps_changed=self._caps_changed)
        self.jobs.register()
        base, jobs = self._running, self.jobs

        def running() -> tuple[list[dict[str, str]], int]:
            items, free = base()
            return items, max(0, free - jobs.running_count())

        self._running = running

    def _caps_changed(self) -> None:
        if self.connected and not self._stop.is_set():
            self.publish_caps()

    def _job_executor(self, name: str) -> Executor:
        """The driver ``name`` for jobs: the reservations' one, or built on first use."""
        if self.executor is not None and name == self.executors[0]:
            return self.executor
        with self._job_executors_lock:
            found = self._job_executors.get(name)
            if found is None:
                found = make_executor(name, ExecutorContext(self.config.worker,
                                                            self.state_dir, self.wid))
                self._job_executors[name] = found
            return found

    def drain(self, draining: bool = True) -> None:
        """Draining: finish current work, accept nothing new; False returns to online."""
        with self._lock:
            self._state = "draining" if draining else "online"
            if self.connected and not self._stop.is_set():
                self._publish_status_locked()
        log.info("worker %s is %s", self._wid or "?", self._state)

    # -- publications --------------------------------------------------------------

    def _collect_caps(self) -> WorkerCaps:
        """The caps document, from the machine and the executors' fingerprints (an
        unknown executor name is a WorkerError here, before anything connects)."""
        offered = [fingerprint(name, self.config.worker) for name in self.executors]
        caps = collect_caps(self._wid, self.config.worker, self.state_dir, offered,
                            AGENT_VERSION)
        if self.cache is not None:  # what the input cache holds, most recently used first
            shared = dict(caps.shared or {})
            data = list(shared.get("data") or [])
            data += [f"sha256:{h}" for h in self.cache.summary(256 - len(data))]
            caps = dataclasses.replace(caps, shared={**shared, "data": data})
        try:
            encode(envelope(caps))
        except WireError as err:
            raise WorkerError(f"invalid worker configuration: {err.reason}") from err
        self._caps = caps
        return caps

    def publish_caps(self) -> None:
        """Collect the capability document again and publish it (retained, QoS 1)."""
        caps = self._collect_caps()
        self.bus.publish(self.topics.worker_caps(self.wid), caps, qos=1, retain=True)

    def _publish_status_locked(self) -> None:
        status = WorkerStatus(wid=self.wid, state=self._state, clean=True)
        self.bus.publish(self.topics.worker_status(self.wid), status, qos=1, retain=True)

    def _on_connected(self) -> None:
        """After every (re)connect: caps, then status, then an immediate heartbeat."""
        if self._stop.is_set():
            return
        identity = self._identity
        if identity is not None and not identity.saved:
            try:  # the broker accepted it: from now on it is this worker's identity
                identity.save_accepted(self.state_dir)
                self._identity = dataclasses.replace(identity, saved=True)
            except WorkerError as err:
                log.error("cannot save the worker identity: %s", err)
        try:
            self.publish_caps()
        except WorkerError as err:
            log.error("cannot publish capabilities: %s", err)
        with self._lock:
            if self._stop.is_set():
                return
            self._publish_status_locked()
        log.info("worker %s online at %s as %s", self.wid, self.config.bus.url, self._state)
        self._wake.set()

    # -- inbox ---------------------------------------------------------------------

    def _on_caps_refresh(self, incoming: Incoming) -> None:
        log.debug("caps.refresh from %s", incoming.sender)
        self.publish_caps()
        self.bus.reply(incoming, Ok())  # only when the sender asked for a reply

    def _on_ping(self, incoming: Incoming) -> None:
        self.bus.reply(
            incoming, Pong(component="worker", version=AGENT_VERSION, principal=self.wid)
        )

    # -- heartbeat -----------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Every ``heartbeat_s`` while connected; woken early by (re)connect and stop."""
        next_at = time.monotonic() + self.heartbeat_s
        while True:
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if now < next_at and not self.connected:
                continue
            next_at = now + self.heartbeat_s
            if self.connected:
                try:
                    self._send_heartbeat()
                except Exception:
                    log.exception("heartbeat failed")

    def _send_heartbeat(self) -> None:
        assert self._sampler is not None
        running, free = self._running()
        attempts = self.jobs.attempt_ids() if self.jobs is not None else None
        beat = self._sampler.sample(self._seq + 1, self.heartbeat_s, free, running,
                                    attempts=attempts)
        self.bus.publish(self.topics.worker_heartbeat(self.wid), beat, qos=0, retain=False)
        self._seq += 1

    def __enter__(self) -> WorkerAgent:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
