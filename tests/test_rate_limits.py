"""Bounded work per principal (issue 8, items 6 and 7).

- Rate limits: a principal flooding the worker (``caps.refresh``) or the coordinator
  (``workers.list``) gets ``rate_limited`` answers, and another principal is answered
  meanwhile. Times are measured (``measurements``), never asserted.
- Heartbeat amplification: a worker listing hundreds of made-up reservation ids in every
  heartbeat costs one query per heartbeat batch and a trickle of ``reservation.close``,
  counted in messages received and SQL statements run.
- The token buckets, the guards' decisions and the settings, without a broker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from broker.bus import Bus, Incoming
from broker.config import BusConfig, CoordinatorConfig, WorkerConfig, load_config
from broker.rate_limit import TokenBuckets
from coordinator.bootstrap import issue_token
from coordinator.handling import Refusal, RequestGuard
from coordinator.reconcile import MAX_CLOSES, RESEND_AFTER_S, SessionReconciler
from coordinator.store import Store
from schemas.codec import Envelope, encode, envelope
from schemas.errors import WireError
from schemas.messages import (
    CapsRefresh,
    Error,
    ExecReport,
    Ping,
    Pong,
    ReservationClose,
    Reserve,
    ReserveReply,
    WorkersList,
    WorkersListReply,
)
from tests.fixtures.actors import FakeWorker, minimal_heartbeat
from tests.fixtures.grid import COORDINATOR, GridHarness, WorkerHandle
from tests.fixtures.services import wait_for
from worker.exec_service import MAX_RUNNING_ITEMS
from worker.request_guard import WorkerRequestGuard

pytestmark = [pytest.mark.integration]

FLOOD = 1000
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas" / "json"

Measure = Callable[[str, float], None]


def flood(bus: Bus, inbox: str, body: Any, n: int = FLOOD) -> list[Future[Envelope[Any]]]:
    return [bus.request_async(inbox, body) for _ in range(n)]


def outcomes(futures: list[Future[Envelope[Any]]], timeout: float = 60.0) -> dict[str, int]:
    """How many replies of each kind (``ok``, ``rate_limited``, ...) the flood got."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    for fut in futures:
        body = fut.result(max(0.1, deadline - time.monotonic())).body
        kind = body.code if isinstance(body, Error) else body.TYPE
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# ------------------------------------------------------------------------------ worker


def test_a_caps_refresh_flood_is_limited_and_others_are_answered(
        grid: GridHarness, measurements: Measure) -> None:
    """Item 7: 1,000 caps.refresh froze a worker's replies for 10 s."""
    from worker.agent import WorkerAgent

    cfg = grid.config_for("wr", "worker")
    cfg.worker.rate_limit_per_s = 10.0
    cfg.worker.rate_limit_burst = 20
    state_dir = grid.tmp_path / "workers" / "wr"
    agent = WorkerAgent(cfg, state_dir=state_dir)
    grid.workers.append(WorkerHandle("wr", state_dir, agent=agent))
    agent.start(timeout=5)
    inbox = grid.topics.worker_inbox("wr")
    # The coordinator principal (the only one that may ask for caps), played by the test.
    coord = grid.bus(COORDINATOR, "coordinator", inbox=grid.topics.coord_inbox)
    bob = grid.bus("bob", "client", inbox=grid.topics.client_inbox("bob"))
    wait_for(lambda: _pong(bob, inbox), message="the worker does not answer")

    started = time.monotonic()
    futures = flood(coord, inbox, CapsRefresh())
    pong = bob.request(inbox, Ping(), timeout=30).body
    pong_s = time.monotonic() - started
    pending_at_pong = sum(not f.done() for f in futures)
    counts = outcomes(futures)
    flood_s = time.monotonic() - started
    measurements("ping_during_flood", pong_s)
    measurements("flood_answered", flood_s)
    measurements("flood_pending_at_pong", float(pending_at_pong))

    assert isinstance(pong, Pong), pong
    assert pending_at_pong > 0, "the ping waited for the whole flood"
    assert set(counts) <= {"ok", "rate_limited"}, counts
    assert counts.get("rate_limited", 0) > 0, counts
    # The bucket: its burst, plus what refilled while the flood was being answered.
    assert counts.get("ok", 0) <= 20 + 10.0 * flood_s + 1, (counts, flood_s)


def _pong(bus: Bus, inbox: str) -> bool:
    try:
        return isinstance(bus.request(inbox, Ping(), timeout=0.5).body, Pong)
    except Exception:
        return False


# ------------------------------------------------------------------------- coordinator


def test_a_request_flood_at_the_coordinator_is_limited_per_principal(
        grid: GridHarness, measurements: Measure) -> None:
    grid.add_principals(("mallory", "client"), ("bob", "client"))
    grid.start_coordinator(rate_limit_per_s=10.0, rate_limit_burst=20)
    mallory = grid.bus("mallory", "client", inbox=grid.topics.client_inbox("mallory"))
    bob = grid.bus("bob", "client", inbox=grid.topics.client_inbox("bob"))
    inbox = grid.topics.coord_inbox

    started = time.monotonic()
    futures = flood(mallory, inbox, WorkersList())
    listed = bob.request(inbox, WorkersList(), timeout=30, raise_errors=False).body
    bob_s = time.monotonic() - started
    counts = outcomes(futures)
    flood_s = time.monotonic() - started
    measurements("other_principal_during_flood", bob_s)
    measurements("flood_answered", flood_s)

    assert isinstance(listed, WorkersListReply), listed  # bob has a bucket of his own
    assert set(counts) <= {"workers.list.reply", "rate_limited"}, counts
    assert counts.get("rate_limited", 0) > 0, counts
    assert counts.get("workers.list.reply", 0) <= 20 + 10.0 * flood_s + 1, (counts, flood_s)
    refused = mallory.request(inbox, WorkersList(), timeout=10, raise_errors=False).body
    if isinstance(refused, Error):  # the bucket may have refilled by now
        assert refused.code == "rate_limited"
        assert "mallory sends requests too fast" in refused.message
        assert refused.detail is not None
        assert refused.detail["retry_after_s"] > 0


# --------------------------------------------------------------------- heartbeats


@pytest.fixture
def reservation_queries(grid: GridHarness) -> Iterator[list[str]]:
    """The SQL statements on the reservation table that the store runs from now on."""
    seen: list[str] = []
    db = grid.store.db
    real: Callable[..., Any] = db.execute_sql

    def counting(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if "xc_reservation" in sql:
            seen.append(sql)
        return real(sql, params, *args, **kwargs)

    db.execute_sql = counting  # type: ignore[method-assign]
    yield seen
    db.execute_sql = real  # type: ignore[method-assign]


def _made_up(tag: str, n: int = MAX_RUNNING_ITEMS) -> list[dict[str, str]]:
    return [{"kind": "reservation", "id": f"r-{tag}{i:04d}"} for i in range(n)]


def _barrier(bus: Bus, grid: GridHarness, worker: FakeWorker) -> None:
    """Wait until everything ``bus`` sent to the worker's inbox so far has arrived (MQTT
    keeps one publisher's order on one topic)."""
    mark = f"r-barrier-{uuid.uuid4().hex[:8]}"
    bus.send(grid.topics.worker_inbox(worker.wid),
             ReservationClose(reservation=mark, reason="barrier"))
    worker.wait_closed(mark)


def test_heartbeats_listing_unknown_sessions_are_not_amplified(
        grid: GridHarness, reservation_queries: list[str], measurements: Measure) -> None:
    """Item 6: 4,096 made-up ids per heartbeat cost 4,096 lookups and 4,096 closes."""
    grid.add_principals(("w1", "worker"), ("alice", "client"))
    coordinator = grid.start_coordinator()
    worker = grid.fake_worker("w1")
    worker.join(heartbeat_s=3600.0)
    alice = grid.bus("alice", "client", inbox=grid.topics.client_inbox("alice"))
    held = alice.request(grid.topics.coord_inbox, Reserve(worker="w1")).body
    assert isinstance(held, ReserveReply)
    rid = held.reservation["id"]
    seen: list[list[dict[str, Any]]] = []
    coordinator.registry.heartbeat_listeners.append(
        lambda wid, running: seen.append(running) if wid == "w1" else None)
    del reservation_queries[:]

    started = time.monotonic()
    beats = 20
    for seq in range(1, beats + 1):
        running = [{"kind": "reservation", "id": rid}, *_made_up(f"{seq:02d}-")][
            :MAX_RUNNING_ITEMS]
        worker.heartbeat(seq, running=running, interval_s=3600.0)
    wait_for(lambda: any(r and r[-1]["id"].startswith(f"r-{beats:02d}-") for r in seen),
             timeout=30, message="the last heartbeat was not reconciled")
    elapsed = time.monotonic() - started
    _barrier(coordinator.bus, grid, worker)

    closes = [c for c in worker.closes if not c.reservation.startswith("r-barrier")]
    measurements("heartbeats_reconciled", elapsed)
    windows = 1 + int(elapsed // RESEND_AFTER_S)
    assert 0 < len(closes) <= MAX_CLOSES * windows + 1, (len(closes), elapsed)
    assert all(c.reservation != rid for c in closes), "the live session was closed"
    if elapsed < RESEND_AFTER_S:
        assert len({c.reservation for c in closes}) == len(closes), "a session told twice"
    assert len(reservation_queries) <= len(seen), (len(reservation_queries), len(seen))


def test_the_reconciler_closes_each_stale_session_once_per_interval(
        grid: GridHarness) -> None:
    """The same, by the clock: bounded per heartbeat, once per session per interval, and
    every stale session is closed in the end."""
    grid.add_principals(("w1", "worker"))
    worker = grid.fake_worker("w1")
    bus = grid.bus(COORDINATOR, "coordinator", inbox=grid.topics.client_inbox("rc"))
    now = [1000.0]
    reconciler = SessionReconciler(bus, grid.store, grid.topics, clock=lambda: now[0])
    stale = _made_up("x", 40)

    def closed() -> list[str]:
        _barrier(bus, grid, worker)
        return [c.reservation for c in worker.closes
                if not c.reservation.startswith("r-barrier")]

    reconciler.on_heartbeat("w1", stale)
    reconciler.on_heartbeat("w1", stale)  # same instant: nothing more
    first = closed()
    assert len(first) == MAX_CLOSES
    now[0] += RESEND_AFTER_S / 2  # half the budget back, no session due again yet
    reconciler.on_heartbeat("w1", stale)
    second = closed()
    assert len(second) == MAX_CLOSES + MAX_CLOSES // 2
    assert len(set(second)) == len(second)
    for _ in range(10):
        now[0] += RESEND_AFTER_S
        reconciler.on_heartbeat("w1", stale)
    assert {item["id"] for item in stale} <= set(closed())


def test_the_heartbeat_schema_caps_the_running_list() -> None:
    schema = json.loads((SCHEMAS / "worker.heartbeat.json").read_text())
    assert schema["definitions"]["metrics"]["properties"]["running"]["maxItems"] == (
        MAX_RUNNING_ITEMS)
    fine = minimal_heartbeat("w1", 1, running=_made_up("a"))
    encode(envelope(fine))
    with pytest.raises(WireError):
        encode(envelope(minimal_heartbeat("w1", 1, running=_made_up("a", 4096))))


# --------------------------------------------------------------------- no broker needed


def test_token_buckets() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0], max_keys=2)
    assert [buckets.allow("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.allow("b")  # one bucket per key
    now[0] += 0.5
    assert buckets.allow("a")
    assert not buckets.allow("a")
    now[0] += 100  # refills only up to the burst
    assert [buckets.allow("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("c")  # the table is bounded: "b" (full again) made room
    assert len(buckets) <= 2
    unlimited = TokenBuckets(rate=0, burst=1)
    assert all(unlimited.allow("a") for _ in range(1000))


def _incoming(mtype_body: Any, sender: str) -> Incoming:
    return Incoming(f"x/coord/inbox/{sender}",
                    envelope(mtype_body, reply_to=f"x/client/{sender}/inbox"), sender)


def test_the_coordinator_guard_limits_per_principal_and_kind(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'guard.db'}")
    try:
        for pid, role in (("alice", "client"), ("bob", "client"), ("w1", "worker")):
            issue_token(store, pid, role)
        now = [0.0]
        config = CoordinatorConfig(rate_limit_per_s=1.0, rate_limit_burst=2,
                                   report_rate_per_s=1.0, report_burst=3)
        guard = RequestGuard(store, config, clock=lambda: now[0])
        listing = _incoming(WorkersList(), "alice")
        guard.admit(listing)
        guard.admit(listing)
        with pytest.raises(Refusal) as refused:
            guard.admit(listing)
        assert refused.value.code == "rate_limited"
        assert refused.value.detail == {"retry_after_s": 1.0}
        guard.admit(_incoming(WorkersList(), "bob"))  # bob's own bucket
        for _ in range(10):
            guard.admit(_incoming(Ping(), "alice"))  # never limited
        report = ExecReport(reservation="r-1", client="alice", exec_id="e", command="c",
                            started_at=0.0)
        for _ in range(3):
            guard.admit(_incoming(report, "w1"))  # the worker's report bucket
        with pytest.raises(Refusal):
            guard.admit(_incoming(report, "w1"))
        now[0] += 1.0
        guard.admit(listing)
    finally:
        store.close()


def test_the_worker_guard_limits_work_not_control() -> None:
    bus = Bus(BusConfig(principal="w1"))  # never started: refusals are only computed
    now = [0.0]
    guard = WorkerRequestGuard(bus, WorkerConfig(rate_limit_per_s=1.0, rate_limit_burst=1),
                               clock=lambda: now[0])
    caps = Incoming("x/worker/w1/inbox/coordinator", envelope(CapsRefresh()), "coordinator")
    assert guard.refusal(caps) is None
    refused = guard.refusal(caps)
    assert refused is not None
    assert refused[0] == "rate_limited"
    close = Incoming("x/worker/w1/inbox/coordinator",
                     envelope(ReservationClose(reservation="r-1")), "coordinator")
    assert all(guard.refusal(close) is None for _ in range(10))
    by_client = Incoming("x/worker/w1/inbox/eve", envelope(CapsRefresh()), "eve")
    forbidden = guard.refusal(by_client)
    assert forbidden is not None
    assert forbidden[0] == "forbidden"


def test_rate_limit_settings_are_typed_from_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text("[coordinator]\nrate_limit_per_s = 5\nreport_burst = 7\n"
                    "[worker]\nrate_limit_burst = 3\n")
    cfg = load_config(toml, env={"XCLOUD_WORKER_RATE_LIMIT_PER_S": "2.5",
                                 "XCLOUD_COORDINATOR_RATE_LIMIT_BURST": "9"})
    assert cfg.coordinator.rate_limit_per_s == 5.0
    assert cfg.coordinator.rate_limit_burst == 9
    assert cfg.coordinator.report_burst == 7
    assert cfg.worker.rate_limit_per_s == 2.5
    assert cfg.worker.rate_limit_burst == 3
