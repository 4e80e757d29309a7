"""The coordinator's per-job CPU (issue 10): a ``jobs.list`` page reads no spec and sizes
its reply with one dump; a job that ends with no children costs no dependency settling.
Each saves part of a short job's coordinator CPU; the answers stay what they were.

MariaDB comes from ``tests/fixtures/services.py`` (``XCLOUD_TEST_MARIADB``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from broker.acl import Role
from coordinator import job_deps
from coordinator.job_requests import REPLY_OVERHEAD, JobRequests, job_summary
from coordinator.job_state import AttemptKind, JobState
from coordinator.store import Store
from schemas.job_messages import JobsList, JobsListReply

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    url = (f"sqlite:///{tmp_path}/xcloud.db" if request.param == "sqlite"
           else str(request.getfixturevalue("fresh_mariadb_url")))
    with Store.open(url) as opened:
        yield opened


def _run(store: Store, jid: str, wid: str = "w1") -> list[Any]:
    made = store.assign_job(jid, wid, now=T0 + 1)
    assert made is not None
    attempt, _ = made
    outcome = store.record_report(attempt.id, wid, AttemptKind.SUCCESS,
                                  outcome={"exit_code": 0}, stdout=None, stderr=None,
                                  outputs=[], started_at=None, ended_at=None, now=T0 + 2)
    return list(outcome.changes)


def test_a_listing_without_spec_is_the_listing_less_the_spec(store: Store) -> None:
    batch, ids = store.submit_jobs("alice", [{"command": f"c{i}", "name": f"n{i}"}
                                             for i in range(7)], now=T0)
    store.submit_jobs("bob", [{"command": "other"}], now=T0)
    _run(store, ids[0])
    for kwargs in ({"owner": "alice", "batch": batch, "limit": 3},
                   {"owner": "alice", "limit": 100},
                   {"owner": None, "state": "queued", "limit": 4},
                   {"owner": "alice", "state": "completed"}):
        full, more = store.list_jobs(**kwargs)
        bare, more_bare = store.list_jobs(**kwargs, spec=False)
        assert more_bare == more
        assert [dataclasses.replace(j, spec={}) for j in full] == bare
        assert all(j.spec for j in full)
    first, more = store.list_jobs(owner="alice", limit=3, spec=False)
    rest, _ = store.list_jobs(owner="alice", after=first[-1].id, limit=100, spec=False)
    assert more
    assert [j.id for j in first + rest] == [
        j.id for j in store.list_jobs(owner="alice", limit=100)[0]]
    done = next(j for j in first + rest if j.id == ids[0])
    assert done.state is JobState.COMPLETED
    assert done.worker == "w1"


def _per_item(items: list[dict[str, Any]], max_payload: int) -> tuple[list[dict[str, Any]],
                                                                      bool]:
    """The reference: each item counted on its own, cut at the first that overflows."""
    kept: list[dict[str, Any]] = []
    size = REPLY_OVERHEAD
    for item in items:
        size += len(json.dumps(item)) + 1
        if size > max_payload:
            return kept, True
        kept.append(item)
    return kept, False


def test_a_listing_is_cut_where_counting_each_item_cuts_it(tmp_path: Any) -> None:
    with Store.open(f"sqlite:///{tmp_path}/xcloud.db") as store:
        _, _ids = store.submit_jobs("alice", [{"command": "true", "name": "x" * (i % 40)}
                                             for i in range(60)], now=T0)
        jobs, _ = store.list_jobs(owner="alice", limit=60)
        items = [job_summary(j) for j in jobs]
        whole = REPLY_OVERHEAD + sum(len(json.dumps(i)) + 1 for i in items)
        guard = SimpleNamespace(role_of=lambda _p: Role.CLIENT)
        for max_payload in (whole + 1000, whole, whole - 1, whole // 2, REPLY_OVERHEAD + 50,
                            REPLY_OVERHEAD):
            handlers = JobRequests(cast(Any, None), store, cast(Any, guard), cast(Any, None),
                                   max_payload=max_payload)
            reply = cast(JobsListReply, handlers.jobs_list(cast(Any, SimpleNamespace(
                body=JobsList(owner="alice", limit=60), sender="alice"))))
            assert (reply.jobs, reply.more) == _per_item(items, max_payload), max_payload


def test_only_a_job_with_children_settles_them(store: Store, monkeypatch: Any) -> None:
    settled: list[str] = []
    real = job_deps.settle_children

    def spy(sql: Any, models: Any, parent: str, ended: JobState, t: float) -> Any:
        settled.append(parent)
        return real(sql, models, parent, ended, t)

    monkeypatch.setattr(job_deps, "settle_children", spy)
    _, (lone, parent) = store.submit_jobs("alice", [{"command": "a"}, {"command": "p"}],
                                          now=T0)
    _, (child,) = store.submit_jobs("alice", [{"command": "c", "after": [parent]}], now=T0)
    assert [c.state for c in _run(store, lone)] == [JobState.COMPLETED]
    assert settled == []  # no children: nothing to settle, no settling run
    assert store.queued_jobs(10)[0].id == parent  # the child waits
    assert [c.job for c in _run(store, parent)] == [parent]
    assert settled == [parent]
    assert [j.id for j in store.queued_jobs(10)] == [child]  # its parent completed
