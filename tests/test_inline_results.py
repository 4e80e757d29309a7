"""Small results carried in ``attempt.report`` (coordinator/inline_results.py): kept as the
job owner's data exactly as an upload of each would be, once; forged, mismatched, stale or
over-quota ones keep nothing. Hand-driven workers (tests/job_actors.py) against the real
coordinator, on both brokers; the worker's side is in tests/test_job_runner.py."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from coordinator.job_state import JobState
from schemas.job_messages import JobsCancel
from schemas.messages import Error, Ok
from tests.fixtures.backends import BOTH_DBS
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

pytestmark = [pytest.mark.integration]


def small(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ref, the inline item) of ``data``."""
    sha = hashlib.sha256(data).hexdigest()
    return {"sha256": sha, "size": len(data)}, {"sha256": sha,
                                                "data": base64.b64encode(data).decode()}


def names(grid: GridHarness, owner: str, jid: str) -> dict[str, str]:
    """``owner``'s data names under job ``jid``: name -> sha256."""
    entries, _total = grid.store.list_data(owner, limit=1000)
    return {e.name: e.sha256 for e in entries if e.name.startswith(f"{jid}/")}


def start_grid(grid: GridHarness, **settings: Any) -> tuple[Any, JobClient, JobWorker, JobWorker]:
    grid.coordinator_settings.update(settings)
    coordinator = start_jobs_coordinator(grid)
    alice = JobClient(grid, "alice")
    w1 = JobWorker(grid, "w1")
    w1.join()
    w2 = JobWorker(grid, "w2")
    w2.join()
    return coordinator, alice, w1, w2


@BOTH_DBS
def test_small_results_in_the_report_are_the_owners_data_once(grid: GridHarness) -> None:
    coordinator, alice, w1, _w2 = start_grid(grid)
    (jid,) = alice.submit({"command": "true", "requirements": {"worker": "w1"}})
    (assign,) = w1.assigned()
    out, out_inline = small(b"hello\n")
    err, err_inline = small(b"warning\n")
    (res, res_inline), uploaded = small(b"42\n"), {"sha256": "cd" * 32, "size": 10 << 20}
    report = {"stdout": out, "stderr": err,
              "outputs": [{"name": "r.txt", **res}, {"name": "big.bin", **uploaded}],
              "inline": [out_inline, err_inline, res_inline]}
    first = w1.report_attempt(assign.attempt, "success", exit_code=0, **report)
    assert isinstance(first, Ok), first
    assert first.detail == {"recorded": True, "counted": True}
    assert names(grid, "alice", jid) == {f"{jid}/stdout": out["sha256"],
                                         f"{jid}/stderr": err["sha256"],
                                         f"{jid}/outputs/r.txt": res["sha256"]}
    files = coordinator.data.files
    assert files.object_path(out["sha256"]).read_bytes() == b"hello\n"
    assert files.object_path(res["sha256"]).read_bytes() == b"42\n"
    result = grid.store.job_result(jid)
    assert result is not None
    assert result.stdout == out
    assert [o["name"] for o in result.outputs] == ["r.txt", "big.bin"]  # (the upload's
    # ref is recorded as the worker said: its transfer stored it, or refused it for good)
    again = w1.report_attempt(assign.attempt, "success", exit_code=0, **report)
    assert isinstance(again, Ok)
    assert again.detail == {"recorded": False, "counted": False}
    assert grid.store.result_count(jid) == (1, 1)
    assert len(names(grid, "alice", jid)) == 3


def test_forged_and_mismatched_inline_results_keep_nothing(grid: GridHarness) -> None:
    _coordinator, alice, w1, w2 = start_grid(grid)
    (jid,) = alice.submit({"command": "true", "requirements": {"worker": "w1"}})
    (assign,) = w1.assigned()
    out, out_inline = small(b"not yours\n")
    # another worker reports w1's attempt, with bytes for its owner: nothing kept
    forged = w2.report_attempt(assign.attempt, "success", exit_code=0, stdout=out,
                               inline=[out_inline])
    assert isinstance(forged, Error)
    assert forged.code == "not_found"
    # bytes that do not hash to their address; a size that is not theirs
    lying = dict(out_inline, sha256="ee" * 32)
    bad = w1.report_attempt(assign.attempt, "success", exit_code=0,
                            stdout={"sha256": "ee" * 32, "size": out["size"]}, inline=[lying])
    assert isinstance(bad, Error)
    assert bad.code == "invalid"
    # (a good stdout beside an output of another size: neither is kept)
    other, other_inline = small(b"other\n")
    sized = w1.report_attempt(assign.attempt, "success", exit_code=0, stdout=other,
                              outputs=[{"name": "o.txt", **out, "size": out["size"] + 1}],
                              inline=[other_inline, out_inline])
    assert isinstance(sized, Error)
    assert sized.code == "invalid"
    assert names(grid, "alice", jid) == {}
    running = grid.store.get_job(jid)
    assert running is not None
    assert running.state is JobState.RUNNING
    assert grid.store.result_count(jid) == (0, 0)
    # a stale attempt's report (the job was cancelled meanwhile): recorded, nothing kept
    cancelled = alice.request(JobsCancel(jobs=[jid]))
    assert isinstance(cancelled, Ok)
    wait_for(lambda: not grid.store.get_attempt(assign.attempt).kind.live,  # type: ignore
             timeout=10, message="the attempt ended by the cancel")
    late = w1.report_attempt(assign.attempt, "success", exit_code=0, stdout=out,
                             inline=[out_inline])
    assert isinstance(late, Ok)
    assert late.detail == {"recorded": True, "counted": False}
    assert names(grid, "alice", jid) == {}


def test_an_inline_result_over_the_owners_quota_is_named_in_the_error(
        grid: GridHarness) -> None:
    _coordinator, alice, w1, _w2 = start_grid(grid, data_quota_bytes=16)
    (jid,) = alice.submit({"command": "true", "requirements": {"worker": "w1"}})
    (assign,) = w1.assigned()
    out, out_inline = small(b"fits\n")
    (res, res_inline) = small(b"x" * 64)
    reply = w1.report_attempt(assign.attempt, "success", exit_code=0, stdout=out,
                              outputs=[{"name": "big.txt", **res}],
                              inline=[out_inline, res_inline])
    assert isinstance(reply, Ok)
    assert names(grid, "alice", jid) == {f"{jid}/stdout": out["sha256"]}
    result = grid.store.job_result(jid)
    assert result is not None
    assert result.outputs == []
    ended = grid.store.get_job(jid)
    assert ended is not None
    assert ended.state is JobState.COMPLETED
    error = result.outcome.get("error") or ""
    assert "big.txt not kept: quota exceeded" in error, result.outcome
    attempt = grid.store.get_attempt(assign.attempt)
    assert attempt is not None
    assert "big.txt not kept" in (attempt.error or ""), attempt.error
