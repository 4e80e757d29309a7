"""``jobs.why`` / ``xcloud why`` and unmatchable jobs (docs/jobs.md, "Why is my job not
running?"): the rejecting requirement with its counts, a waiting job's place in the queue,
someone else's job not found, the submit warning and the hold of a job no worker can run.
Two hand-driven workers (tests/job_actors.py) of different tags and arch on a real grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.job_state import JobState
from coordinator.store import JobRecord
from schemas.job_messages import JobsSubmit, JobsSubmitted, JobsWhy, JobsWhyReply
from schemas.messages import Error
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import JobClient, JobWorker, start_jobs_coordinator

pytestmark = [pytest.mark.integration]
ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def two_workers(grid: GridHarness) -> tuple[JobWorker, JobWorker]:
    """``w-x86`` (tag cpu, x86_64) and ``w-arm`` (tag gpu-a100, arm64), one slot each."""
    x86 = JobWorker(grid, "w-x86")
    x86.join(tags=["cpu"], host={"os": "linux", "arch": "x86_64"})
    arm = JobWorker(grid, "w-arm")
    arm.join(tags=["gpu-a100"], host={"os": "linux", "arch": "arm64"})
    return x86, arm


def why(client: JobClient, jid: str) -> JobsWhyReply:
    reply = client.request(JobsWhy(job=jid))
    assert isinstance(reply, JobsWhyReply), reply
    return reply


def rows(reply: JobsWhyReply) -> dict[tuple[str, str], tuple[int, int]]:
    return {(r["name"], r["wanted"]): (r["match"], r["reject"])
            for r in reply.requirements or ()}


def job(grid: GridHarness, jid: str) -> JobRecord:
    record = grid.store.get_job(jid)
    assert record is not None
    return record


@ONE_BROKER
def test_why_names_the_rejecting_requirement_with_counts(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=0)
    alice = JobClient(grid, "alice")
    two_workers(grid)
    (nobody,) = alice.submit({"command": "true", "requirements": {"tags": ["gpu-h200"]}})
    reply = why(alice, nobody)
    assert reply.state == "queued"
    assert reply.workers == {"known": 2, "online": 2}
    assert rows(reply)[("tag", "gpu-h200")] == (0, 2)
    assert reply.matching is not None
    assert reply.matching["all"] == 0
    assert reply.verdict == "no online worker has tag gpu-h200"
    # Each requirement met by one worker, never both by the same one.
    (split,) = alice.submit({"command": "true", "requirements": {
        "tags": ["gpu-a100"], "arch": "x86_64"}})
    reply = why(alice, split)
    assert rows(reply)[("tag", "gpu-a100")] == (1, 1)
    assert rows(reply)[("arch", "x86_64")] == (1, 1)
    assert rows(reply)[("cpus", "1")] == (2, 0)
    assert reply.verdict == "no online worker meets all of its requirements at once"
    example = {r["name"]: r.get("example") for r in reply.requirements or ()}
    assert example["arch"] == "w-arm: its arch is arm64, x86_64 wanted"
    assert job(grid, split).state is JobState.QUEUED  # unmatchable_hold_s = 0: never held


@ONE_BROKER
def test_a_job_waiting_for_a_slot_reports_its_place(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=0)
    alice = JobClient(grid, "alice")
    x86, _arm = two_workers(grid)
    spec = {"command": "sleep 100", "requirements": {"tags": ["cpu"]}}
    ids = alice.submit(spec, spec, spec)
    (assign,) = x86.assigned()
    first = assign.job
    # One batch shares its submission time: the queue orders it by id.
    second, third = sorted(j for j in ids if j != first)
    reply = why(alice, third)
    assert reply.state == "queued"
    assert reply.ahead == 1
    assert reply.matching == {"all": 1, "free": 0, "busy": 1, "reserved": 0, "draining": 0}
    assert reply.verdict == "waiting for a free slot on 1 matching worker(s): 1 job(s) ahead"
    assert why(alice, second).ahead == 0
    running = why(alice, first)
    assert running.state == "running"
    assert running.worker == "w-x86"
    assert running.verdict == "it is running on worker w-x86"
    assert running.requirements is None


@ONE_BROKER
def test_someone_elses_job_is_not_found(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    grid.add_principals(("bob", "client"))
    alice = JobClient(grid, "alice")
    bob = JobClient(grid, "bob")
    (jid,) = alice.submit({"command": "true"})
    refused = bob.request(JobsWhy(job=jid))
    assert isinstance(refused, Error)
    assert refused.code == "not_found"
    assert isinstance(alice.request(JobsWhy(job=jid)), JobsWhyReply)
    missing = alice.request(JobsWhy(job="j-0000000000000000"))
    assert isinstance(missing, Error)
    assert missing.code == "not_found"


@ONE_BROKER
def test_submit_warns_of_an_unmatchable_job_and_holds_it_later(grid: GridHarness) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=1.0)
    alice = JobClient(grid, "alice")
    x86, _arm = two_workers(grid)
    x86.auto = True
    reply = alice.request(JobsSubmit(jobs=[
        {"command": "true", "requirements": {"arch": "riscv64"}},
        {"command": "true", "requirements": {"tags": ["cpu"]}},
    ]))
    assert isinstance(reply, JobsSubmitted)
    unmatchable, fine = reply.ids
    assert reply.warnings == [{"job": unmatchable, "message":
                               "matches no known worker: no worker has arch riscv64"}]
    wait_for(lambda: job(grid, unmatchable).state is JobState.HELD, 15,
             message="the unmatchable job held")
    held = job(grid, unmatchable)
    assert held.hold_code == "unmatchable"
    assert held.hold_reason == "no known worker can run it: no worker has arch riscv64"
    wait_for(lambda: job(grid, fine).state is JobState.COMPLETED, 15,
             message="the matchable job ran")
    wait_for(lambda: "held" in alice.states_of(unmatchable), 10, message="alice told")
    reply_why = why(alice, unmatchable)
    assert reply_why.state == "held"
    assert reply_why.hold_code == "unmatchable"


@ONE_BROKER
def test_cli_prints_the_verdict_and_the_submit_warning(grid: GridHarness,
                                                         tmp_path: Path) -> None:
    start_jobs_coordinator(grid, unmatchable_hold_s=0)
    two_workers(grid)
    env = grid.subprocess_env(
        XCLOUD_HOME=str(tmp_path / "home"), XCLOUD_BUS_PRINCIPAL="alice",
        XCLOUD_BUS_TOKEN=grid.token("alice", "client"), XCLOUD_BUS_URL=grid.url,
        XCLOUD_BUS_ROOT=grid.root)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120,
                              check=False)

    sub = cli("submit", "--tag", "gpu-h200", "--", "true")
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip()
    assert (f"warning: job {jid} matches no known worker: no worker has tag gpu-h200"
            in sub.stderr)
    out = cli("why", jid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{jid}: queued: no online worker has tag gpu-h200\n")
    assert "workers: 2 known, 2 online" in out.stdout

