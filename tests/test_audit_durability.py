"""The exec audit trail survives crashes (issue 8, item 10).

An ``exec.report`` used to be acknowledged while it still sat in the coordinator's 0.2 s
write batch: a coordinator killed then lost it. Now the coordinator answers ``ok`` only
after the row is committed, and the worker keeps every report (on disk) and sends it
again until it got that answer (worker/exec_reports.py). Each report is recorded once.

The coordinator runs as a real ``xcloud coordinator`` process here, so that it can be
killed with SIGKILL; broker, database and worker are the grid harness's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.bus import Bus, Incoming
from schemas.grants import public_key_to_text, sign_grant
from schemas.messages import (
    CoordPubkey,
    ExecReport,
    ExecStart,
    ExecStarted,
    Ok,
    ReservationOpen,
    Reserve,
    ReserveReply,
)
from tests.fixtures.coordinator_process import CoordinatorProcess
from tests.fixtures.grid import COORDINATOR, GridHarness, WorkerHandle
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration]

COMMANDS = 20


@pytest.fixture
def coordinator_process(grid: GridHarness) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(grid, XCLOUD_COORDINATOR_DEFAULT_HEARTBEAT_S="0.2")
    try:
        yield process
    finally:
        process.stop()


def test_acknowledged_reports_survive_a_coordinator_kill(
        grid: GridHarness, coordinator_process: CoordinatorProcess) -> None:
    grid.add_principals(("alice", "client"))
    coordinator_process.start()
    handle = grid.start_worker("w1")
    assert handle.agent is not None
    service = handle.agent.exec_service
    assert service is not None
    assert service.key_ready.wait(10)
    reports = service.reports
    assert reports is not None
    alice = grid.bus("alice", "client", inbox=grid.topics.client_inbox("alice"))
    held = alice.request(grid.topics.coord_inbox, Reserve(worker="w1", lease_s=120),
                         timeout=15).body
    assert isinstance(held, ReserveReply), held
    rid = held.reservation["id"]
    exec_ids = [f"e{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(COMMANDS)]
    # Started together, they end together: their reports arrive in one burst.
    futures = [alice.request_async(grid.topics.worker_inbox("w1"), ExecStart(
        grant=held.grant, exec_id=exec_id, command="sleep 1", mode="background"))
        for exec_id in exec_ids]
    for fut in futures:
        assert isinstance(fut.result(15).body, ExecStarted), fut.result().body

    # Every report acknowledged, then the coordinator dies at once.
    wait_for(lambda: reports.acknowledged == COMMANDS, timeout=30, interval=0.002,
             message=f"acknowledged {reports.acknowledged} of {COMMANDS} reports")
    coordinator_process.kill()

    rows = grid.store.list_exec_audit(reservation_id=rid, limit=1000)
    assert sorted(r.exec_id for r in rows) == sorted(exec_ids)
    coordinator_process.start()  # and nothing is recorded twice after the restart
    assert reports.pending() == 0
    rows = grid.store.list_exec_audit(reservation_id=rid, limit=1000)
    assert len(rows) == COMMANDS


class StandIn:
    """The coordinator principal played by the test: it receives exec reports and
    acknowledges them only when told to (``ack``) — a coordinator that dies with a
    batch unwritten acknowledges nothing."""

    def __init__(self, grid: GridHarness, key: Ed25519PrivateKey, *, ack: bool) -> None:
        self.reports: list[ExecReport] = []
        self.bus = grid.bus(COORDINATOR, "coordinator", inbox=grid.topics.coord_inbox,
                            start=False)
        self.ack = ack

        def on_report(incoming: Incoming) -> None:
            self.reports.append(incoming.body)
            if self.ack:
                self.bus.reply(incoming, Ok())

        self.bus.on_inbox("exec.report", on_report)
        self.bus.start(timeout=10)
        body = CoordPubkey(alg="ed25519", key=public_key_to_text(key.public_key()))
        self.bus.publish(grid.topics.coord_pubkey, body, retain=True).wait_for_publish(5)


def test_the_worker_sends_unacknowledged_reports_again(grid: GridHarness) -> None:
    """Reports that a coordinator received but never acknowledged (it died before its
    batch was written) reach the next coordinator."""
    from worker.agent import WorkerAgent

    grid.add_principals(("alice", "client"))
    key = Ed25519PrivateKey.generate()
    first = StandIn(grid, key, ack=False)
    cfg = grid.config_for("w1", "worker")
    state_dir = grid.tmp_path / "workers" / "w1"
    agent = WorkerAgent(cfg, state_dir=state_dir)
    grid.workers.append(WorkerHandle("w1", state_dir, agent=agent))
    agent.start(timeout=5)
    service = agent.exec_service
    assert service is not None
    assert service.key_ready.wait(10)
    assert service.reports is not None
    rid = f"r-{uuid.uuid4().hex[:12]}"
    opened = first.bus.request(grid.topics.worker_inbox("w1"), ReservationOpen(
        reservation={"id": rid, "worker": "w1", "client": "alice",
                     "expires_at": time.time() + 120}), timeout=15).body
    assert isinstance(opened, Ok), opened
    grant = sign_grant(key, rid=rid, client="alice", worker="w1", exp=time.time() + 120)
    alice = grid.bus("alice", "client", inbox=grid.topics.client_inbox("alice"))
    exec_ids = {f"e{i}" for i in range(5)}
    for exec_id in sorted(exec_ids):
        started = _start(alice, grid, grant, exec_id)
        assert isinstance(started, ExecStarted), started
    wait_for(lambda: {r.exec_id for r in first.reports} == exec_ids, timeout=20,
             message="the first coordinator did not get the reports")
    first.bus.stop()  # gone without acknowledging anything
    assert service.reports.pending() == len(exec_ids)
    assert len(list((state_dir / "reports").glob("*.json"))) == len(exec_ids)

    second = StandIn(grid, key, ack=True)
    wait_for(lambda: service.reports is not None and service.reports.pending() == 0,
             timeout=60, message="the reports were not sent again")
    assert {r.exec_id for r in second.reports} == exec_ids
    assert not list((state_dir / "reports").glob("*.json"))


def test_reports_kept_on_disk_are_sent_by_the_next_worker_run(grid: GridHarness) -> None:
    """A worker restarted before its reports were acknowledged still delivers them."""
    from worker.exec_reports import ReportOutbox

    key = Ed25519PrivateKey.generate()
    state_dir = grid.tmp_path / "outbox"
    worker_bus = grid.bus("w1", "worker", inbox=grid.topics.worker_inbox("w1"), start=False)
    outbox = ReportOutbox(worker_bus, grid.topics, state_dir, coordinator=COORDINATOR)
    outbox.start()
    worker_bus.start(timeout=10)
    report = ExecReport(reservation="r-1", client="alice", exec_id="e1", command="true",
                        started_at=time.time(), exit_code=0)
    outbox.add(report)  # nobody listens: unacknowledged
    outbox.close()
    worker_bus.stop()

    coord = StandIn(grid, key, ack=True)
    again_bus = grid.bus("w1", "worker", inbox=grid.topics.worker_inbox("w1"), start=False)
    again = ReportOutbox(again_bus, grid.topics, state_dir, coordinator=COORDINATOR)
    again.start()
    try:
        assert again.pending() == 1
        again_bus.start(timeout=10)
        wait_for(lambda: again.pending() == 0, timeout=30, message="not sent again")
        assert [r.exec_id for r in coord.reports] == ["e1"]
    finally:
        again.close()


def _start(bus: Bus, grid: GridHarness, grant: str, exec_id: str) -> Any:
    return bus.request(grid.topics.worker_inbox("w1"), ExecStart(
        grant=grant, exec_id=exec_id, command="true", mode="background"), timeout=15).body
