"""The dashboard over HTTP, against a real grid: access rules, the JSON API, live
updates and /metrics (parsed with prometheus_client's own parser).

One grid for the module (tests/browser/support.py): an embedded broker, a coordinator
serving the dashboard on a free port, two real workers heartbeating every 0.2 s.
The browser half is tests/browser/test_browser.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import MonitoringConfig
from coordinator.http.api import DashboardContext
from coordinator.http.server import DashboardError, DashboardServer
from coordinator.monitoring.service import MonitoringService
from coordinator.store import Store
from coordinator.worker_state import WorkerState
from tests.browser.support import Http, basic, bearer, dashboard_grid, dashboard_url
from tests.fixtures.grid import ADMIN, GridHarness
from tests.fixtures.leaks import ThreadGuard
from tests.fixtures.services import wait_for

WORKERS = ("dw1", "dw2")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridHarness]:
    with dashboard_grid(tmp_path_factory.mktemp("dashboard")) as harness:
        for wid in WORKERS:
            harness.start_worker(wid)
        harness.add_principals(("alice", "client"), ("bob", "client"), ("mallory", "client"))
        yield harness


@pytest.fixture
def http(grid: GridHarness) -> Http:
    return Http(dashboard_url(grid))


def admin_token(grid: GridHarness) -> str:
    return grid.token(ADMIN, "admin")


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


# --------------------------------------------------------------------------- access


def test_nothing_but_the_login_page_without_a_token(http: Http) -> None:
    page = http.get("/")
    assert page.status == 200
    assert b"login-form" in page.body
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for path in ("/api/me", "/api/workers", "/api/overview", "/api/workers/dw1/series",
                 "/api/reservations", "/api/audit", "/api/events", "/metrics"):
        reply = http.get(path)
        assert reply.status == 401, path
        assert b"dw1" not in reply.body
    assert http.post("/api/workers/dw1/drain", {"drain": True}).status == 401


def test_login_checks_the_token_against_the_store(grid: GridHarness, http: Http) -> None:
    worker_token = grid.token("dw1", "worker")
    assert http.login(ADMIN, "wrong").status == 401
    assert http.login("nobody", admin_token(grid)).status == 401
    assert http.login("dw1", worker_token).status == 401  # workers have no dashboard
    assert http.get("/api/me").status == 401
    reply = http.login(ADMIN, admin_token(grid))
    assert reply.status == 200
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    me = http.get("/api/me").json()
    assert (me["principal"], me["role"]) == (ADMIN, "admin")
    assert http.request("POST", "/api/logout", {}, {"X-XCloud-CSRF": me["csrf"]}).status == 200
    assert http.get("/api/me").status == 401


def test_a_login_that_is_not_json_is_refused(http: Http, grid: GridHarness) -> None:
    form = f"principal={ADMIN}&token={admin_token(grid)}".encode()
    import urllib.request

    request = urllib.request.Request(http.base + "/api/login", data=form, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        urllib.request.urlopen(request, timeout=5)
        status = 200
    except urllib.error.HTTPError as err:
        status = err.code
    assert status == 415


def test_posts_need_the_csrf_header_and_our_own_origin(grid: GridHarness, http: Http) -> None:
    assert http.login(ADMIN, admin_token(grid)).status == 200
    assert http.post("/api/workers/dw2/drain", {"drain": True}, csrf=False).status == 403
    evil = http.post("/api/workers/dw2/drain", {"drain": True},
                     Origin="http://evil.example")
    assert evil.status == 403
    assert grid.store.get_worker("dw2").state == WorkerState.ONLINE  # type: ignore[union-attr]
    # A page of another site cannot read our API either (its Origin is refused).
    assert http.get("/api/workers", Origin="http://evil.example").status == 403


def test_an_admin_drains_and_resumes_a_worker_from_the_page(grid: GridHarness,
                                                            http: Http) -> None:
    assert http.login(ADMIN, admin_token(grid)).status == 200
    reply = http.post("/api/workers/dw2/drain", {"drain": True}, Origin=http.base)
    assert reply.status == 200, reply.body
    assert reply.json() == {"worker": "dw2", "state": "draining"}
    record = grid.store.get_worker("dw2")
    assert record is not None
    assert record.state == WorkerState.DRAINING
    assert record.state_reason == f"drained by {ADMIN}"  # the workers.drain rule's words
    assert http.post("/api/workers/dw2/drain", {"drain": False}).json()["state"] == "online"
    assert http.post("/api/workers/nope/drain", {"drain": True}).status == 404
    assert http.post("/api/workers/dw2/drain", {"drain": "yes"}).status == 400


def test_a_client_may_not_drain(grid: GridHarness, http: Http) -> None:
    assert http.login("alice", grid.token("alice", "client")).status == 200
    assert http.post("/api/workers/dw1/drain", {"drain": True}).status == 403
    assert grid.store.get_worker("dw1").state == WorkerState.ONLINE  # type: ignore[union-attr]


def test_bearer_and_basic_take_the_same_pair(grid: GridHarness, http: Http) -> None:
    token = admin_token(grid)
    assert http.get("/api/workers", **bearer(ADMIN, token)).status == 200
    assert http.get("/metrics", **basic(ADMIN, token)).status == 200
    assert http.get("/api/workers", **bearer(ADMIN, token + "x")).status == 401
    assert http.get("/api/workers", Authorization=f"Bearer {token}").status == 401
    assert http.get("/metrics", **bearer("dw1", grid.token("dw1", "worker"))).status == 401
    # Bearer POSTs are not ambient: no CSRF token needed.
    reply = http.post("/api/workers/dw1/drain", {"drain": False}, csrf=False,
                      **bearer(ADMIN, token))
    assert reply.status == 200


def test_a_revoked_principal_loses_its_session(grid: GridHarness, http: Http) -> None:
    token = grid.token("mallory", "client")
    assert http.login("mallory", token).status == 200
    assert http.get("/api/workers").status == 200
    grid.store.revoke_principal("mallory")
    wait_for(lambda: http.get("/api/workers").status == 401, 5,
             message="revoked session refused")
    assert http.login("mallory", token).status == 401
    assert http.get("/api/workers", **bearer("mallory", token)).status == 401


# --------------------------------------------------------------------------- the API


def test_the_workers_table_lists_live_workers_with_their_load(grid: GridHarness,
                                                              http: Http) -> None:
    assert http.login("bob", grid.token("bob", "client")).status == 200

    def rows() -> dict[str, Any] | None:
        found = {w["id"]: w for w in http.get("/api/workers").json()["workers"]}
        ok = all(w in found and "cpu" in found[w] for w in WORKERS)
        return found if ok else None

    found = wait_for(rows, 10, message="both workers with metrics")
    assert found is not None
    for wid in WORKERS:
        row = found[wid]
        assert row["state"] == "online"
        assert row["cpus"] >= 1
        assert row["memory_bytes"] > 0
        assert row["slots"] == 1
        assert row["last_seen"] > 0
        assert 0 <= row["cpu"] <= 100


def test_holders_are_shown_to_themselves_and_admins_only(grid: GridHarness,
                                                         http: Http) -> None:
    alice = grid.client("alice", "client")
    reservation = alice.reserve("dw1", lease_s=60)
    try:
        def held(viewer: Http) -> dict[str, Any] | None:
            rows = {w["id"]: w for w in viewer.get("/api/workers").json()["workers"]}
            seen: dict[str, Any] | None = rows["dw1"]["reservation"]
            return seen

        as_alice = Http(http.base)
        as_alice.login("alice", grid.token("alice", "client"))
        as_bob = Http(http.base)
        as_bob.login("bob", grid.token("bob", "client"))
        as_admin = Http(http.base)
        as_admin.login(ADMIN, admin_token(grid))
        assert held(as_alice)["client"] == "alice"  # type: ignore[index]
        assert held(as_admin)["client"] == "alice"  # type: ignore[index]
        assert held(as_bob) == {"state": "active"}
        assert [r["client"] for r in as_alice.get("/api/reservations").json()[
            "reservations"]] == ["alice"]
        assert as_bob.get("/api/reservations").json()["reservations"] == []
        assert len(as_admin.get("/api/reservations").json()["reservations"]) == 1
        reservation.run("echo audited")
        assert as_bob.get("/api/audit?client=alice").status == 403

        def audited() -> list[dict[str, Any]]:
            records: list[dict[str, Any]] = as_alice.get("/api/audit").json()["records"]
            return records

        records = wait_for(audited, 10, message="the exec in alice's audit log")
        assert records[0]["command"] == "echo audited"
        assert as_bob.get("/api/audit").json()["records"] == []
        assert as_admin.get("/api/audit?client=alice").json()["records"][0]["client"] == "alice"
    finally:
        reservation.release()


def test_a_worker_page_has_history_and_series_from_real_heartbeats(grid: GridHarness,
                                                                   http: Http) -> None:
    http.login("bob", grid.token("bob", "client"))
    detail = http.get("/api/workers/dw1").json()
    assert detail["events"][-1]["new_state"] == "online"
    assert detail["caps"]["cpu"]["count"] >= 1
    series = http.get("/api/workers/dw1/series?range=900").json()
    assert series["res"] == 0
    samples = grid.store.raw_series("dw1", series["now"] - 900, series["now"] + 1, 100_000)
    stored = {float(row[2]): row[3] for row in samples}
    points = [(t, v) for t, v in zip(series["t"], series["cpu"], strict=True) if v is not None]
    assert len(points) >= 5
    assert all(stored[t] == v for t, v in points)
    assert http.get("/api/workers/dw1/series?range=5").status == 400
    assert http.get("/api/workers/none/series?range=900").status == 404
    assert http.get("/api/workers/dw1/series?range=86400").json()["res"] == 60


def test_the_overview_counts_the_grid(grid: GridHarness, http: Http) -> None:
    http.login("bob", grid.token("bob", "client"))
    data = http.get("/api/overview").json()
    online = len(grid.store.list_workers(state=WorkerState.ONLINE))
    assert data["grid"]["workers_online"] == online
    assert data["grid"]["slots_total"] >= online
    assert "t" in data["series"]


def test_live_updates_arrive_as_server_sent_events(grid: GridHarness, http: Http) -> None:
    url = http.base.removeprefix("http://")
    host, port = url.split(":")
    token = admin_token(grid)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: {url}\r\nAuthorization: Bearer "
                     f"{ADMIN}:{token}\r\n\r\n".encode())
        stream = sock.makefile("rb")
        assert b"200" in stream.readline()
        ticks: list[dict[str, Any]] = []
        while len(ticks) < 3:
            line = stream.readline()
            assert line, "stream closed"
            if line.startswith(b"data: {\"now\""):
                ticks.append(json.loads(line[6:]))
    seen = {w["id"] for tick in ticks for w in tick["workers"]}
    assert seen & set(WORKERS)
    assert all("workers_online" in tick["grid"] for tick in ticks)


# --------------------------------------------------------------------------- /metrics


def test_metrics_match_the_grid(grid: GridHarness, http: Http) -> None:
    admin = grid.client()
    admin.workers()  # one workers.list request through the guarded handler
    token = admin_token(grid)
    first = metrics(http.get("/metrics", **bearer(ADMIN, token)).body.decode())
    by_state: dict[str, int] = {}
    for record in grid.store.list_workers():
        by_state[record.state.value] = by_state.get(record.state.value, 0) + 1
    for state in WorkerState:
        assert first[("xcloud_workers", (("state", state.value),))] == by_state.get(
            state.value, 0)
    assert first[("xcloud_request_duration_seconds_count", (("type", "workers.list"),))] >= 1
    live = grid.store.list_workers(state=WorkerState.ONLINE)
    assert first[("xcloud_slots", (("kind", "total"),))] == sum(w.slots for w in live)
    for record in live:
        cpu = first[("xcloud_worker_cpu_percent", (("worker", record.id),))]
        assert 0 <= cpu <= 100
    wait_for(lambda: metrics(http.get("/metrics", **bearer(ADMIN, token)).body.decode())[
        ("xcloud_heartbeats_total", ())] > first[("xcloud_heartbeats_total", ())], 5,
        message="heartbeats counted")
    # Labels stay bounded: no reservation or exec ids anywhere.
    for (name, labels), _value in first.items():
        assert {k for k, _ in labels} <= {"state", "kind", "type", "worker", "gpu", "outcome",
                                          "le"}, name


def test_exec_durations_come_from_the_audit_trail(grid: GridHarness, http: Http) -> None:
    token = admin_token(grid)

    def count() -> float:
        found = metrics(http.get("/metrics", **bearer(ADMIN, token)).body.decode())
        return sum(v for (name, _), v in found.items()
                   if name == "xcloud_exec_duration_seconds_count")

    before = count()
    reservation = grid.client("bob", "client").reserve("dw2", lease_s=60)
    try:
        reservation.run("true")
    finally:
        reservation.release()
    assert grid.coordinator is not None
    grid.coordinator.reservations.audit.flush()
    grid.coordinator.monitoring.run_pass()
    assert count() >= before + 1


# --------------------------------------------------------------------------- no grid


@pytest.fixture
def bare_store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'bare.db'}") as store:
        yield store


def bare_server(store: Store, **settings: Any) -> DashboardServer:
    config = MonitoringConfig(**{"http": True, "http_port": 0, **settings})
    monitoring = MonitoringService(config, store, heartbeats_total=lambda: 0)

    def no_drain(_principal: str, _wid: str, _drain: bool) -> dict[str, Any]:
        raise AssertionError("not here")

    return DashboardServer(DashboardContext(
        store=store, config=config, monitoring=monitoring, drain=no_drain,
        flush_audit=lambda: None, grid="test", coordinator="coordinator", version="0"))


def test_metrics_may_be_opened_to_anonymous_scrapes(bare_store: Store) -> None:
    server = bare_server(bare_store, metrics_public=True)
    server.start()
    try:
        http = Http(server.url.rstrip("/"))
        reply = http.get("/metrics")
        assert reply.status == 200
        assert ("xcloud_workers", (("state", "online"),)) in metrics(reply.body.decode())
        assert http.get("/api/workers").status == 401  # only /metrics opens
    finally:
        server.stop()


def test_the_listener_binds_loopback_and_a_taken_port_is_a_clear_error(
        bare_store: Store) -> None:
    threads = ThreadGuard(prefix="dashboard")
    server = bare_server(bare_store)
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        taken = bare_server(bare_store, http_port=server.port)
        with pytest.raises(DashboardError, match="--http PORT"):
            taken.start()
    finally:
        server.stop()
    threads.check()  # the refused one left nothing running either


def test_failed_logins_are_limited(bare_store: Store) -> None:
    server = bare_server(bare_store)
    server.start()
    try:
        http = Http(server.url.rstrip("/"))
        statuses = [http.login("admin", f"guess-{i}").status for i in range(12)]
        assert statuses[:10] == [401] * 10
        assert statuses[-1] == 429
    finally:
        server.stop()
