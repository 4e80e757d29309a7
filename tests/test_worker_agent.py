"""The worker agent against a real broker of each kind (``broker_kind``: the embedded
amqtt, or Mosquitto with the exported password file and ACL), on the shared grid harness
(tests/fixtures/grid.py) with no coordinator: the watchers stand in for it.

Everything waits on observed messages (``wait_for``), never on sleeps.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Incoming
from broker.config import BusConfig, Config
from schemas.messages import CapsRefresh, Ok, Ping, Pong, WorkerCaps, WorkerHeartbeat, WorkerStatus
from tests.fixtures.backends import BrokerHandle
from tests.fixtures.grid import ADMIN, COORDINATOR, REPO, GridHarness
from tests.fixtures.leaks import ThreadGuard
from tests.fixtures.services import free_port, wait_for
from worker.agent import WorkerAgent, build_bus
from worker.errors import IdentityError, WorkerError
from worker.executors import DRIVERS
from worker.identity import load_identity
from worker.main import run_worker

pytestmark = [pytest.mark.integration]


class Watcher:
    """A separate MQTT client that records the workers' status, caps and heartbeats.

    An admin by default (it may read all three); ``principal=COORDINATOR`` for one that
    sends what only the coordinator may (caps.refresh). The grid stops its bus.
    """

    def __init__(self, grid: GridHarness, name: str = "watcher", principal: str = ADMIN,
                 role: str = "admin") -> None:
        topics = grid.topics
        self.bus = grid.bus(principal, role, client_id=f"{name}-{uuid.uuid4().hex[:8]}",
                            inbox=topics.client_inbox(principal), start=False)
        self._lock = threading.Lock()
        self.messages: list[Incoming] = []
        for topic in (topics.all_worker_status, topics.all_worker_caps,
                      topics.all_worker_heartbeat):
            self.bus.subscribe(topic, self._record)
        self.bus.start(timeout=5)

    def _record(self, incoming: Incoming) -> None:
        with self._lock:
            self.messages.append(incoming)

    def of(self, cls: type[Any], wid: str) -> list[Incoming]:
        with self._lock:
            return [m for m in self.messages
                    if isinstance(m.body, cls) and getattr(m.body, "wid", None) == wid]

    def bodies(self, cls: type[Any], wid: str) -> list[Any]:
        return [m.body for m in self.of(cls, wid)]

    def last_status(self, wid: str) -> WorkerStatus | None:
        statuses = self.bodies(WorkerStatus, wid)
        return statuses[-1] if statuses else None

    def wait_status(self, wid: str, state: str, clean: bool | None = None,
                    timeout: float = 10.0) -> WorkerStatus:
        def check() -> WorkerStatus | None:
            last = self.last_status(wid)
            if last and last.state == state and (clean is None or last.clean == clean):
                return last
            return None
        found = wait_for(check, timeout, message=f"{wid} status {state} (clean={clean}); "
                         f"last seen {self.last_status(wid)}")
        assert found is not None
        return found


@pytest.fixture
def watchers(grid: GridHarness) -> Callable[..., Watcher]:
    """``watchers(name, principal=ADMIN, role="admin")``: a started :class:`Watcher`."""

    def make(name: str = "watcher", principal: str = ADMIN, role: str = "admin") -> Watcher:
        return Watcher(grid, name, principal, role)

    return make


@pytest.fixture
def agents(grid: GridHarness) -> Iterator[list[WorkerAgent]]:  # noqa: ARG001 - outlives them
    """Agents to stop at the end, before the grid checks for leaked threads."""
    made: list[WorkerAgent] = []
    yield made
    for agent in made:
        agent.stop()


def _worker_settings(cfg: Config, heartbeat_s: float, worker: dict[str, Any]) -> Config:
    cfg.worker.heartbeat_s = heartbeat_s
    cfg.worker.tags = ["test"]
    for key, value in worker.items():
        setattr(cfg.worker, key, value)
    return cfg


def make_config(grid: GridHarness, wid: str = "w1", heartbeat_s: float = 0.2,
                **worker: Any) -> Config:
    """The config of worker principal ``wid`` (created on first use) on ``grid``."""
    return _worker_settings(grid.config_for(wid, "worker"), heartbeat_s, worker)


def offline_config(tmp_path: Path, url: str, wid: str = "w1", heartbeat_s: float = 0.2,
                   **worker: Any) -> Config:
    """A worker config for ``url``, where no broker need listen."""
    cfg = Config(home=tmp_path / "home")
    cfg.bus.url = url
    cfg.bus.principal = wid
    cfg.bus.reconnect_min_s = 0.5
    cfg.bus.reconnect_max_s = 1.0
    return _worker_settings(cfg, heartbeat_s, worker)


def start_agent(agents: list[WorkerAgent], cfg: Config, **kwargs: Any) -> WorkerAgent:
    agent = WorkerAgent(cfg, **kwargs)
    agents.append(agent)
    agent.start(timeout=5)
    return agent


# ------------------------------------------------------------------------ join / leave


def test_late_subscriber_gets_retained_caps_and_online(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
) -> None:
    early = watchers("early")
    agent = start_agent(agents, make_config(grid, slots=2))
    early.wait_status("w1", "online", clean=True)
    wait_for(lambda: early.of(WorkerCaps, "w1"), message="caps")

    late = watchers("late")
    caps = wait_for(lambda: late.of(WorkerCaps, "w1"), message="retained caps")[0]
    status = wait_for(lambda: late.of(WorkerStatus, "w1"), message="retained status")[0]
    assert caps.retained
    assert status.retained
    assert caps.topic == grid.topics.worker_caps("w1")
    assert caps.body.slots == 2
    assert caps.body.tags == ["test"]
    assert caps.body.executors == ["process"]
    assert caps.body.heartbeat_s == 0.2
    assert status.body.state == "online"
    assert status.body.clean is True
    assert agent.state == "online"
    assert agent.caps == caps.body


def test_heartbeats_arrive_with_increasing_seq(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
) -> None:
    watcher = watchers()
    start_agent(agents, make_config(grid, slots=3))
    wait_for(lambda: len(watcher.of(WorkerHeartbeat, "w1")) >= 4, message="4 heartbeats")
    beats = watcher.of(WorkerHeartbeat, "w1")
    seqs = [b.body.seq for b in beats]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[0] == 1
    first = beats[0].body
    assert first.interval_s == 0.2
    assert first.free_slots == 3
    assert first.running == []
    assert 0 <= first.cpu_percent <= 100
    assert first.mem_used_bytes > 0
    assert all(not b.retained and b.topic == grid.topics.worker_heartbeat("w1") for b in beats)


def test_running_provider_feeds_the_heartbeat(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
) -> None:
    watcher = watchers()
    agent = start_agent(agents, make_config(grid, slots=2))
    agent.set_running_provider(lambda: ([{"kind": "exec", "id": "e1"}], 1))
    busy = wait_for(lambda: [b.body for b in watcher.of(WorkerHeartbeat, "w1")
                             if b.body.running], message="busy heartbeat")
    beat = busy[0]
    assert beat.running == [{"kind": "exec", "id": "e1"}]
    assert beat.free_slots == 1


def test_caps_refresh_republishes_and_ping_gets_pong(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
) -> None:
    # caps.refresh is the coordinator's to send (no coordinator runs on this grid)
    watcher = watchers("coordinator", COORDINATOR, "coordinator")
    start_agent(agents, make_config(grid))
    wait_for(lambda: watcher.of(WorkerCaps, "w1"), message="first caps")
    count = len(watcher.of(WorkerCaps, "w1"))
    watcher.bus.send(grid.topics.worker_inbox("w1"), CapsRefresh())
    wait_for(lambda: len(watcher.of(WorkerCaps, "w1")) > count, message="republished caps")
    count = len(watcher.of(WorkerCaps, "w1"))
    ack = watcher.bus.request(grid.topics.worker_inbox("w1"), CapsRefresh(), timeout=5)
    assert isinstance(ack.body, Ok)
    wait_for(lambda: len(watcher.of(WorkerCaps, "w1")) > count, message="caps again")

    reply = watcher.bus.request(grid.topics.worker_inbox("w1"), Ping(), timeout=5)
    assert isinstance(reply.body, Pong)
    assert reply.body.component == "worker"
    assert reply.body.principal == "w1"


def test_drain_and_clean_stop(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
) -> None:
    watcher = watchers()
    agent = start_agent(agents, make_config(grid))
    watcher.wait_status("w1", "online")
    agent.drain(True)
    watcher.wait_status("w1", "draining", clean=True)
    assert agent.state == "draining"
    agent.drain(False)
    watcher.wait_status("w1", "online")
    agent.stop()
    status = watcher.wait_status("w1", "offline", clean=True)
    assert status.reason == "stopped"
    assert agent.state == "offline"
    assert not agent.connected
    late = watchers("late")
    retained = wait_for(lambda: late.of(WorkerStatus, "w1"), message="retained offline")[0]
    assert retained.retained
    assert retained.body.state == "offline"
    assert retained.body.clean
    agent.stop()  # idempotent


def test_agent_accepts_a_ready_bus(
    grid: GridHarness, watchers: Callable[..., Watcher], agents: list[WorkerAgent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every executor named is fingerprinted through the registry for the caps document.
    monkeypatch.setitem(DRIVERS, "fake", "tests.executors.test_registry:FakeExecutor")
    watcher = watchers()
    cfg = make_config(grid, wid="w9")
    bus = build_bus(cfg, "w9", cfg.bus.token)
    start_agent(agents, cfg, bus=bus, executors=["process", "fake"])
    caps = wait_for(lambda: watcher.bodies(WorkerCaps, "w9"), message="caps")[0]
    assert caps.executors == ["process", "fake"]

    wrong = WorkerAgent(make_config(grid, wid="w8"), bus=build_bus(cfg, "w9", cfg.bus.token))
    with pytest.raises(WorkerError, match="inbox"):
        wrong.start()


# ------------------------------------------------------------------------ bad starts


def test_missing_identity_and_bad_config_fail_before_connecting(
    tmp_path: Path, no_leaked_threads: ThreadGuard,  # noqa: ARG001 - a guard
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: must not matter
    cfg = offline_config(tmp_path, url, wid="")
    with pytest.raises(IdentityError, match="xcloud admin principal add"):
        WorkerAgent(cfg).start()
    with pytest.raises(IdentityError):
        run_worker(cfg, stop=threading.Event())
    bad = offline_config(tmp_path, url, tags=["x" * 65])
    with pytest.raises(WorkerError, match="invalid worker configuration"):
        WorkerAgent(bad).start()
    with pytest.raises(WorkerError, match="heartbeat_s"):
        WorkerAgent(offline_config(tmp_path, url, heartbeat_s=0))
    with pytest.raises(WorkerError, match="unknown executor 'nope'"):
        WorkerAgent(offline_config(tmp_path, url), executors=["nope"]).start()


# ------------------------------------------------------------------------ crashes


def _worker_process(grid: GridHarness, wid: str) -> subprocess.Popen[bytes]:
    """``run_worker`` in a child process, as worker principal ``wid`` of ``grid``."""
    tmp_path = grid.tmp_path
    env = grid.subprocess_env(
        XCLOUD_HOME=str(tmp_path / f"home-{wid}"),
        XCLOUD_CONFIG=str(tmp_path / "none.toml"),
        XCLOUD_BUS_URL=grid.url,
        XCLOUD_BUS_ROOT=grid.root,
        XCLOUD_BUS_PRINCIPAL=wid,
        XCLOUD_BUS_TOKEN=grid.token(wid, "worker"),
        XCLOUD_WORKER_HEARTBEAT_S="0.2",
    )
    code = ("import logging, sys\n"
            "from broker.config import load_config\n"
            "from worker.main import run_worker\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "sys.exit(run_worker(load_config()))\n")
    log = (tmp_path / f"{wid}.log").open("wb")
    try:
        return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    finally:
        log.close()


def test_killed_worker_leaves_its_last_will(
    grid: GridHarness, watchers: Callable[..., Watcher],
) -> None:
    watcher = watchers()
    proc = _worker_process(grid, "wk")
    try:
        watcher.wait_status("wk", "online", timeout=20)
        wait_for(lambda: watcher.of(WorkerHeartbeat, "wk"), message="heartbeat")
        proc.kill()
        proc.wait(10)
        status = watcher.wait_status("wk", "offline")
        assert status.clean is False
        assert status.reason == "connection lost"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_stops_the_worker_cleanly(
    grid: GridHarness, watchers: Callable[..., Watcher],
) -> None:
    watcher = watchers()
    proc = _worker_process(grid, "wt")
    try:
        watcher.wait_status("wt", "online", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        status = watcher.wait_status("wt", "offline", clean=True)
        assert status.reason == "shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # the identity given by environment was kept for the next start (once accepted)
    kept = load_identity(grid.tmp_path / "home-wt" / "worker", BusConfig())
    assert (kept.wid, kept.token, kept.saved) == ("wt", grid.token("wt", "worker"), True)


def test_agent_survives_a_broker_restart(
    grid: GridHarness, grid_broker: BrokerHandle, watchers: Callable[..., Watcher],
    agents: list[WorkerAgent],
) -> None:
    agent = start_agent(agents, make_config(grid))
    first = watchers("first")
    first.wait_status("w1", "online")
    seq_before = agent.heartbeats_sent

    grid_broker.kill()  # a crash: retained messages are gone (no persistence on either)
    wait_for(lambda: not agent.connected, message="agent noticed the broker went away")
    grid_broker.start()
    wait_for(lambda: agent.connected and agent.bus.reconnects >= 1, 20,
             message="agent reconnected by itself")

    fresh = watchers("fresh")
    wait_for(lambda: fresh.of(WorkerCaps, "w1"), message="caps republished after restart")
    fresh.wait_status("w1", "online", clean=True)
    beats = wait_for(lambda: fresh.of(WorkerHeartbeat, "w1"), message="heartbeats resumed")
    assert beats[0].body.seq > seq_before


def test_run_worker_waits_for_a_late_broker(
    grid: GridHarness, grid_broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("worker.main.WARN_EVERY_S", 0.1)
    cfg = make_config(grid, wid="wl")  # the principal exists before the broker goes
    grid_broker.stop()  # nothing listens on its port until it starts again
    stop = threading.Event()
    result: list[int] = []
    caplog.set_level(logging.WARNING, logger="worker.main")
    runner = threading.Thread(target=lambda: result.append(run_worker(cfg, stop=stop)))
    runner.start()
    try:
        wait_for(lambda: any("no MQTT broker reachable" in r.getMessage()
                             for r in caplog.records), message="warning about the broker")
        grid_broker.start()  # the same port: the worker finds it there
        watcher = Watcher(grid)
        watcher.wait_status("wl", "online", timeout=20)
        stop.set()
        runner.join(10)
        assert result == [0]
        watcher.wait_status("wl", "offline", clean=True)
    finally:
        stop.set()
        runner.join(10)
