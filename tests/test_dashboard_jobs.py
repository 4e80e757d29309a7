"""The dashboard's jobs: ``/api/jobs`` (own jobs for a client, all for an admin), a job's
page data (attempts, timeline, output preview from the data store), live ``jobs_changed``
ticks, the job series, and ``/metrics`` job values (parsed with prometheus_client's
parser) against the store; the job queries on SQLite and MariaDB.

One grid for the module (tests/browser/support.py): an embedded broker, a coordinator
serving the dashboard, one hand-driven job worker (tests/job_actors.py).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.http.jobs_views import PREVIEW_BYTES
from coordinator.job_state import ENDINGS, TERMINAL, AttemptKind, JobState
from coordinator.monitoring.job_metrics import JOB_BUCKETS, JobSeries
from coordinator.monitoring.job_queries import (
    attempts_ended_by_kind,
    job_duration_buckets,
    job_state_counts,
    jobs_page,
)
from coordinator.store import Store
from coordinator.store.job_records import JobRecord
from schemas.messages import Ok
from tests.browser.support import Http, bearer, dashboard_grid, dashboard_url
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import ADMIN, GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker

WORKER = "jw1"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridHarness]:
    with dashboard_grid(tmp_path_factory.mktemp("dashboard-jobs")) as harness:
        harness.add_principals(("alice", "client"), ("bob", "client"))
        yield harness


@pytest.fixture(scope="module")
def worker(grid: GridHarness) -> JobWorker:
    w = JobWorker(grid, WORKER)
    w.join(slots=4)
    return w


@pytest.fixture(scope="module")
def alice(grid: GridHarness) -> JobClient:
    return JobClient(grid, "alice")


@pytest.fixture(scope="module")
def bob(grid: GridHarness) -> JobClient:
    return JobClient(grid, "bob")


def logged_in(grid: GridHarness, principal: str, role: str) -> Http:
    http = Http(dashboard_url(grid))
    assert http.login(principal, grid.token(principal, role)).status == 200
    return http


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


def finish(grid: GridHarness, worker: JobWorker, jid: str, *, exit_code: int = 0,
           stdout: bytes | None = None) -> str:
    """Let ``worker`` run ``jid`` to its end; its stdout stored as a data object file."""
    wait_for(lambda: any(a.job == jid for a in worker.assigns), 10, message=f"{jid} assigned")
    aid = next(a.attempt for a in worker.assigns if a.job == jid)
    assert isinstance(worker.started(aid), Ok)
    ref = None
    if stdout is not None:
        sha = hashlib.sha256(stdout).hexdigest()
        assert grid.coordinator is not None
        path = grid.coordinator.data.files.object_path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stdout)
        ref = {"sha256": sha, "size": len(stdout)}
    kind = "success" if exit_code == 0 else "exit_nonzero"
    reply = worker.report_attempt(aid, kind, exit_code=exit_code, duration_s=0.1, stdout=ref)
    assert isinstance(reply, Ok)
    wait_for(lambda: job(grid, jid).state.terminal, 10, message=f"{jid} ended")
    return aid


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


# --------------------------------------------------------------------------- the API


def test_clients_see_their_own_jobs_and_admins_all(grid: GridHarness, worker: JobWorker,
                                                   alice: JobClient, bob: JobClient) -> None:
    mine = alice.submit({"command": "echo one", "name": "a1"},
                        {"command": "echo two", "name": "a2"})
    (theirs,) = bob.submit({"command": "echo bob", "name": "b1"})
    as_alice = logged_in(grid, "alice", "client")
    listed = as_alice.get("/api/jobs").json()
    assert {j["id"] for j in listed["jobs"]} >= set(mine)
    assert all(j["owner"] == "alice" for j in listed["jobs"])
    assert theirs not in {j["id"] for j in listed["jobs"]}
    assert listed["all"] is False
    # Another owner's job does not exist for a client, over HTTP as over the bus.
    assert as_alice.get(f"/api/jobs/{theirs}").status == 404
    assert as_alice.get(f"/api/jobs/{mine[0]}").json()["command"] == "echo one"
    admin = Http(dashboard_url(grid))
    everything = admin.request("GET", "/api/jobs", headers=bearer(
        ADMIN, grid.token(ADMIN, "admin"))).json()
    assert {*mine, theirs} <= {j["id"] for j in everything["jobs"]}
    assert everything["all"] is True
    own = admin.request("GET", "/api/jobs?mine=1", headers=bearer(
        ADMIN, grid.token(ADMIN, "admin"))).json()
    assert own["jobs"] == []
    assert admin.request("GET", f"/api/jobs/{theirs}", headers=bearer(
        ADMIN, grid.token(ADMIN, "admin"))).json()["owner"] == "bob"
    # Newest first (one batch shares its submission time: then by id), paged with a
    # cursor; filtered by state.
    order = sorted(mine, reverse=True)
    first = as_alice.get("/api/jobs?limit=1").json()
    assert first["more"] is True
    (newest,) = first["jobs"]
    assert newest["id"] == order[0]
    after = as_alice.get(f"/api/jobs?limit=1&before={newest['id']}").json()
    assert after["jobs"][0]["id"] == order[1]
    for jid in (*mine, theirs):
        finish(grid, worker, jid)
    completed = as_alice.get("/api/jobs?state=completed").json()["jobs"]
    assert set(mine) <= {j["id"] for j in completed}
    assert all(j["state"] == "completed" for j in completed)
    assert as_alice.get("/api/jobs?state=queued,running").json()["jobs"] == []
    bad = as_alice.get("/api/jobs?state=nonsense")
    assert bad.status == 400
    assert "nonsense" in bad.json()["error"]
    assert as_alice.get("/api/jobs?limit=x").status == 400


def test_a_job_page_has_its_attempts_and_an_output_preview(grid: GridHarness,
                                                          worker: JobWorker,
                                                          alice: JobClient) -> None:
    as_alice = logged_in(grid, "alice", "client")
    (jid,) = alice.submit({"command": "yes | head -c 70000", "name": "big"})
    wait_for(lambda: job(grid, jid).state is JobState.RUNNING, 10, message="running")
    running = as_alice.get(f"/api/jobs/{jid}").json()
    assert running["state"] == "running"
    assert running["result"] is None
    assert [a["kind"] for a in running["attempts_list"]] in (["assigned"], ["running"])
    text = (b"y\n" * 40_000)[:70_000]
    aid = finish(grid, worker, jid, stdout=text)
    detail = as_alice.get(f"/api/jobs/{jid}").json()
    assert detail["state"] == "completed"
    (attempt,) = detail["attempts_list"]
    assert attempt["id"] == aid
    assert attempt["kind"] == "success"
    assert attempt["worker"] == WORKER
    assert attempt["assigned_at"] <= attempt["started_at"] <= attempt["ended_at"]
    assert attempt["acked_at"] is not None
    result = detail["result"]
    assert result["exit_code"] == 0
    assert result["stdout"]["size"] == len(text)
    preview = result["stdout_preview"]
    assert preview["text"] == text[:PREVIEW_BYTES].decode()
    assert preview["shown"] == PREVIEW_BYTES
    assert preview["truncated"] is True
    assert result["stderr_preview"] is None


def test_job_changes_arrive_as_live_ticks(grid: GridHarness, worker: JobWorker,
                                          alice: JobClient) -> None:
    url = dashboard_url(grid).removeprefix("http://")
    host, port = url.split(":")
    token = grid.token(ADMIN, "admin")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: {url}\r\nAuthorization: Bearer "
                     f"{ADMIN}:{token}\r\n\r\n".encode())
        stream = sock.makefile("rb")
        assert b"200" in stream.readline()

        def next_tick() -> dict[str, Any]:
            while True:
                line = stream.readline()
                assert line, "stream closed"
                if line.startswith(b"data: {\"now\""):
                    tick: dict[str, Any] = json.loads(line[6:])
                    return tick

        for _ in range(3):  # settled: nothing moves
            quiet = next_tick()
        assert quiet["jobs_changed"] is False
        (jid,) = alice.submit({"command": "true"})
        for _ in range(20):
            tick = next_tick()
            if tick["jobs_changed"]:
                break
        else:
            raise AssertionError("no tick said the jobs changed")
        assert "jobs_queued" in tick["grid"]
    finish(grid, worker, jid)


def test_the_overview_series_count_jobs(grid: GridHarness, alice: JobClient) -> None:
    assert grid.coordinator is not None
    # No worker has the tag: the job stays queued.
    (jid,) = alice.submit({"command": "true", "name": "waits",
                           "requirements": {"tags": ["nowhere"]}})
    counts = job_state_counts(grid.store)
    assert counts["queued"] >= 1
    grid.coordinator.monitoring.run_pass()
    data = logged_in(grid, "bob", "client").get("/api/overview").json()
    assert data["grid"]["jobs_queued"] == counts["queued"]
    assert data["grid"]["jobs_running"] == counts["running"]
    # The stored 10 s bucket averages this pass's sample with any earlier one in it.
    assert 0 < data["series"]["jobs_queued"][-1] <= counts["queued"]
    assert job(grid, jid).state is JobState.QUEUED


def test_job_metrics_match_the_store(grid: GridHarness, worker: JobWorker,
                                     alice: JobClient) -> None:
    (ok,) = alice.submit({"command": "true"})
    finish(grid, worker, ok)
    (bad,) = alice.submit({"command": "false"})
    finish(grid, worker, bad, exit_code=1)
    text = Http(dashboard_url(grid)).request(
        "GET", "/metrics", headers=bearer(ADMIN, grid.token(ADMIN, "admin"))).body.decode()
    found = metrics(text)
    jobs: list[JobRecord] = []
    after = None
    while True:
        page, more = grid.store.list_jobs(owner=None, after=after, limit=500)
        jobs += page
        if not more:
            break
        after = page[-1].id
    assert jobs, "the earlier tests submitted jobs"
    for state in JobState:
        assert found[("xcloud_jobs", (("state", state.value),))] == sum(
            1 for j in jobs if j.state is state), state
    ended: dict[str, int] = {}
    for j in jobs:
        for attempt in grid.store.job_attempts(j.id)[0]:
            if not attempt.kind.live:
                ended[attempt.kind.value] = ended.get(attempt.kind.value, 0) + 1
    assert ended.get("success", 0) >= 1
    assert ended.get("exit_nonzero", 0) >= 1
    assert found[("xcloud_jobs", (("state", "failed"),))] >= 1
    for kind in ENDINGS:
        assert found[("xcloud_job_attempts_ended_total", (("kind", kind.value),))] == \
            ended.get(kind.value, 0), kind
    for state in TERMINAL:
        done = [j for j in jobs if j.state is state and j.ended_at is not None]
        labels = (("state", state.value),)
        assert found[("xcloud_job_duration_seconds_count", labels)] == len(done)
        assert found[("xcloud_job_duration_seconds_sum", labels)] == pytest.approx(
            sum(j.ended_at - j.submitted_at for j in done if j.ended_at is not None))
        first = (("le", str(JOB_BUCKETS[0])), ("state", state.value))
        assert found[("xcloud_job_duration_seconds_bucket", first)] == sum(
            1 for j in done if j.ended_at is not None
            and j.ended_at - j.submitted_at <= JOB_BUCKETS[0])
    # Bounded labels: states and kinds, never ids.
    for (name, label_set), _value in found.items():
        if name.startswith("xcloud_job"):
            assert {k for k, _ in label_set} <= {"state", "kind", "le"}, name


# --------------------------------------------------------------------------- no grid


@pytest.fixture
def job_store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as store:
        yield store


@BOTH_DBS
def test_job_queries_on_both_databases(job_store: Store) -> None:
    store = job_store
    _batch, ids = store.submit_jobs("alice", [{"command": f"echo {i}"} for i in range(4)],
                                    now=1000.0)
    _b, (bobs,) = store.submit_jobs("bob", [{"command": "echo bob"}], now=1001.0)
    for jid, (kind, end) in zip(ids[:3], [(AttemptKind.SUCCESS, 1003.0),
                                          (AttemptKind.EXIT_NONZERO, 1100.0),
                                          (AttemptKind.SUCCESS, 1010.0)], strict=True):
        assigned = store.assign_job(jid, "w1", now=1002.0)
        assert assigned is not None
        store.end_attempt(assigned[0].id, kind, now=end)
    assert store.assign_job(bobs, "w1", now=1002.0) is not None
    counts = job_state_counts(store)
    assert counts == {"queued": 1, "running": 1, "held": 0, "completed": 2, "failed": 1,
                      "cancelled": 0}
    assert attempts_ended_by_kind(store) == {"success": 2, "exit_nonzero": 1}
    buckets = job_duration_buckets(store, (5.0, 60.0, 1000.0))
    assert buckets["completed"][:2] == ([1, 2, 2], 2)
    assert buckets["completed"][2] == pytest.approx(13.0)
    assert buckets["failed"][:2] == ([0, 0, 1], 1)
    assert buckets["failed"][2] == pytest.approx(100.0)
    page, more = jobs_page(store, owner="alice", states=None, before=None, limit=3)
    assert more is True
    assert [j.id for j in page] == sorted(ids, reverse=True)[:3]
    rest, more = jobs_page(store, owner="alice", states=None, before=page[-1].id, limit=3)
    assert more is False
    assert {j.id for j in page + rest} == set(ids)
    everybody, _ = jobs_page(store, owner=None, states=["running"], before=None, limit=10)
    assert [j.id for j in everybody] == [bobs]


def test_completed_per_minute_follows_the_terminal_counts(tmp_path: Any) -> None:
    now = [5000.0]
    with Store.open(f"sqlite:///{tmp_path / 'rate.db'}") as store:
        series = JobSeries(store, clock=lambda: now[0])
        assert series.source(now[0])["jobs_completed_per_min"] == 0.0
        _b, ids = store.submit_jobs("alice", [{"command": "true"}] * 3, now=now[0])
        for jid in ids:
            assigned = store.assign_job(jid, "w1", now=now[0])
            assert assigned is not None
            store.end_attempt(assigned[0].id, AttemptKind.SUCCESS, now=now[0] + 1)
        now[0] += 30
        values = series.source(now[0])
        assert values["jobs_completed_per_min"] == pytest.approx(3.0)
        assert values["jobs_failed_per_min"] == 0.0
        now[0] += 120  # the window moved past the completions
        series.source(now[0])
        now[0] += 10
        assert series.source(now[0])["jobs_completed_per_min"] == 0.0
