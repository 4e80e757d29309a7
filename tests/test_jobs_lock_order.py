"""A cancel or hold racing the report of the job's running attempt (coordinator/store/jobs.py,
"Lock order"): both finish, on MariaDB too, where a report locks the attempt row and then
the job row, and a cancel that locked them the other way round deadlocked (error 1213).

The report is paused right after it locked its attempt until the cancel's transaction is
seen waiting for a lock (``information_schema.INNODB_TRX``), so the two always meet in the
same place. SQLite holds the whole file from a writer's BEGIN: the cancel waits for the
whole report, there is nothing to pause for, and the outcome must be the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from coordinator.job_state import AttemptKind, JobState
from coordinator.store import Store
from coordinator.store.job_records import ReportOutcome
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.services import MariaDBServer, wait_for

pytestmark = [BOTH_DBS]

ATTEMPT_LOCK = "SELECT * FROM {attempt} WHERE {id} = {?}{lock}"  # record_report's first read
REPORTER = "reporter"


@pytest.fixture
def store(grid_db_url: str) -> Iterator[Store]:
    with Store.open(grid_db_url) as opened:
        yield opened


def lock_waits(request: pytest.FixtureRequest, url: str) -> Callable[[], int]:
    """How many transactions on this test's database wait for a row lock (MariaDB)."""
    server: MariaDBServer = request.getfixturevalue("mariadb_server")
    conn = server.connect()
    request.addfinalizer(conn.close)
    database = urlsplit(url).path.lstrip("/")

    def count() -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.INNODB_TRX t "
                        "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
                        "WHERE t.trx_state = 'LOCK WAIT' AND p.DB = %s", (database,))
            return int(cur.fetchone()[0])

    return count


class PausedAfterAttemptLock:
    """The store's statement runner, pausing the reporter thread once, right after it read
    (and on MySQL locked) its attempt row: it says so (``locked``), then waits until
    ``resume()`` is true."""

    def __init__(self, inner: Any, resume: Callable[[], object]) -> None:
        self.inner = inner
        self.resume = resume
        self.locked = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def rows(self, template: str, *params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.inner.rows(template, *params)
        if (template == ATTEMPT_LOCK and threading.current_thread().name == REPORTER
                and not self.locked.is_set()):
            self.locked.set()
            # InnoDB refreshes INNODB_TRX only when it was not read for 0.1 s: poll slower.
            wait_for(self.resume, 20, interval=0.25,
                     message="no transaction waited for the attempt's lock")
        return rows


def race(store: Store, request: pytest.FixtureRequest, grid_db_url: str, aid: str, wid: str,
         change: Callable[[], Any]) -> tuple[ReportOutcome, Any]:
    """Run a success report of ``aid`` paused after its attempt lock, and ``change`` in
    this thread meanwhile; both results (an error in either fails the test)."""
    if store.backend == "mysql":
        waits = lock_waits(request, grid_db_url)
        runner = PausedAfterAttemptLock(store._sql, lambda: waits() > 0)
    else:
        runner = PausedAfterAttemptLock(store._sql, lambda: True)
    store._sql = runner  # type: ignore[assignment]
    reported: list[ReportOutcome] = []
    failed: list[BaseException] = []

    def report() -> None:
        try:
            reported.append(store.record_report(
                aid, wid, AttemptKind.SUCCESS, outcome={"exit_code": 0}, stdout=None,
                stderr=None, outputs=[], started_at=None, ended_at=None))
        except BaseException as err:  # handed to the test thread
            failed.append(err)

    thread = threading.Thread(target=report, name=REPORTER)
    thread.start()
    try:
        assert runner.locked.wait(20), "the report did not reach its attempt's lock"
        changed = change()
    finally:
        thread.join(60)
    assert not thread.is_alive()
    assert not failed, f"the report failed: {failed[0]!r}"
    return reported[0], changed


def running_job(store: Store) -> tuple[str, str]:
    _batch, (jid,) = store.submit_jobs("alice", [{"command": "true"}])
    made = store.assign_job(jid, "w1")
    assert made is not None
    return jid, made[0].id


@pytest.mark.parametrize("target", [JobState.CANCELLED, JobState.HELD])
def test_a_cancel_or_hold_racing_the_report_waits_for_it(
        store: Store, request: pytest.FixtureRequest, grid_db_url: str,
        target: JobState) -> None:
    """The report locked the attempt first: the cancel (hold) waits for it, then finds
    the job completed and counts it unchanged."""
    jid, aid = running_job(store)
    outcome, (changes, kills, counts) = race(
        store, request, grid_db_url, aid, "w1",
        lambda: store.change_jobs([jid], target, requester="alice", admin=False))
    assert outcome.recorded
    assert outcome.counted
    assert [c.state for c in outcome.changes] == [JobState.COMPLETED]
    assert (changes, kills) == ([], [])
    assert counts == {"changed": 0, "unchanged": 1, "unknown": 0}
    job = store.get_job(jid)
    assert job is not None
    assert job.state is JobState.COMPLETED
    attempt = store.get_attempt(aid)
    assert attempt is not None
    assert attempt.kind is AttemptKind.SUCCESS
    assert store.result_count(jid) == (1, 1)


def test_a_cancel_of_a_replicated_job_waits_for_a_replicas_report(
        store: Store, request: pytest.FixtureRequest, grid_db_url: str) -> None:
    """Replicas 2 / quorum 2: the cancel waits for the report of one replica (recorded,
    not counted: no quorum yet), then ends the other one and cancels the job."""
    _batch, (jid,) = store.submit_jobs(
        "alice", [{"command": "true", "replicas": 2, "quorum": 2}])
    first, second = store.assign_job(jid, "w1"), store.assign_job(jid, "w2")
    assert first is not None
    assert second is not None
    outcome, (changes, kills, counts) = race(
        store, request, grid_db_url, first[0].id, "w1",
        lambda: store.change_jobs([jid], JobState.CANCELLED, requester="alice", admin=False))
    assert outcome.recorded
    assert not outcome.counted
    assert kills == [(second[0].id, "w2")]
    assert counts == {"changed": 1, "unchanged": 0, "unknown": 0}
    assert [c.state for c in changes] == [JobState.CANCELLED]
    job = store.get_job(jid)
    assert job is not None
    assert job.state is JobState.CANCELLED
    kinds = {a.id: a.kind for a in store.job_attempts(jid)[0]}
    assert kinds == {first[0].id: AttemptKind.SUCCESS, second[0].id: AttemptKind.CANCELLED}
    assert store.result_count(jid) == (0, 1)
