"""The worker's job runner (worker/job_runner.py) against a stand-in coordinator.

A real broker (amqtt and Mosquitto), a real WorkerAgent with the process executor, and a
bus of the ``coordinator`` principal that plays the coordinator's part of the contract
(docs/jobs.md): it serves input data by SHA-256 (a transfer endpoint over a directory),
receives the results the worker uploads, answers ``attempt.started`` and
``attempt.report`` and records them, and sends ``job.assign`` / ``job.kill``. The end to
end tests with the real coordinator are in tests/test_jobs_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.bus import Bus, Incoming, Lane, RemoteError
from broker.transfer import SourceFile, TransferEndpoint, TransferRefused
from schemas.codec import to_wire
from schemas.job_messages import (
    INLINE_MAX_BYTES,
    INLINE_MAX_FILES,
    AttemptRecorded,
    AttemptReport,
    AttemptStarted,
    JobAssign,
    JobKill,
)
from schemas.messages import Error, Ok, WorkerHeartbeat
from tests.fixtures.grid import COORDINATOR, GridHarness, WorkerHandle
from tests.fixtures.services import wait_for
from tests.fixtures.transfer import DirSink
from worker.attempt_journal import AttemptJournal
from worker.job_attempts import AttemptRecord, AttemptStore

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class HashSource:
    """Data objects by SHA-256 in one directory (the coordinator's DataSource, reduced)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetches: list[str] = []

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / sha).write_bytes(data)
        return sha

    def open_fetch(self, requester: str, source: dict[str, Any]) -> SourceFile:  # noqa: ARG002
        sha = str(source.get("sha256", ""))
        path = self.root / sha
        if not path.is_file():
            raise TransferRefused("not_found", f"no data {sha[:12]}")
        self.fetches.append(sha)
        return SourceFile(path, path.stat().st_size, sha, sha)


@dataclass
class StandIn:
    """The coordinator's side, recorded."""

    bus: Bus
    source: HashSource
    sink: DirSink
    wid: str
    started: list[str] = field(default_factory=list)
    reports: list[AttemptReport] = field(default_factory=list)
    refuse_reports: int = 0  # answer the first N reports `unavailable`
    refuse_inline: bool = False  # answer reports with results inline `invalid` (older)
    inline_refused: int = 0
    beats: list[WorkerHeartbeat] = field(default_factory=list)
    carry: list[JobAssign] = field(default_factory=list)  # in the next report's answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_started(self, incoming: Incoming) -> None:
        self.started.append(incoming.body.attempt)
        self.bus.reply(incoming, Ok())

    def on_report(self, incoming: Incoming) -> None:
        with self.lock:
            if self.refuse_reports > 0:
                self.refuse_reports -= 1
                self.bus.reply_error(incoming, "unavailable", "not now")
                return
            if self.refuse_inline and incoming.body.inline:
                self.inline_refused += 1
                self.bus.reply_error(incoming, "invalid", "unknown field inline")
                return
            self.reports.append(incoming.body)
            carry, self.carry = self.carry, []
        if carry:  # the next assignments ride in the answer (attempt.recorded)
            items = [to_wire(self.bus.request_carried(body)[0]) for body in carry]
            self.bus.reply(incoming, AttemptRecorded(recorded=True, counted=True,
                                                     assign=items))
            return
        self.bus.reply(incoming, Ok())

    def on_beat(self, incoming: Incoming) -> None:
        self.beats.append(incoming.body)

    def assign(self, command: str, **spec: Any) -> str:
        attempt = new_id("a")
        inputs = [{"name": n, "sha256": s, "size": 1} for n, s in
                  (spec.pop("inputs", None) or {}).items()]
        stdin = spec.pop("stdin", None)
        body = JobAssign(attempt=attempt, job=new_id("j"), owner="alice",
                         spec={"command": command, **spec}, inputs=inputs, lease_s=30,
                         stdin={"sha256": stdin, "size": 1} if stdin else None)
        assert isinstance(self.send_assign(body), Ok | AttemptReport)
        return attempt

    def send_assign(self, body: JobAssign, timeout: float = 10) -> Any:
        """``job.assign``; the worker's ``Ok`` (RemoteError for a refusal), or, for a job that
        was reported before its ``ok`` was due, the accepted report (which answers the
        assignment: the worker then sends no ``ok``, worker/assign_answers.py)."""
        reply = self.bus.request_async(self.worker_inbox, body)
        wait_for(lambda: reply.done() or self.reported(body.attempt) is not None,
                 timeout=timeout, message=f"an answer to job.assign {body.attempt}")
        if reply.done():
            answer = reply.result().body
            if isinstance(answer, Error):
                raise RemoteError(answer, body.TYPE)
            return answer
        reply.cancel()
        return self.reported(body.attempt)

    def reported(self, attempt: str) -> AttemptReport | None:
        with self.lock:
            return next((r for r in self.reports if r.attempt == attempt), None)

    @property
    def worker_inbox(self) -> str:
        return self.bus.topics.worker_inbox(self.wid)

    def report(self, attempt: str, timeout: float = 20) -> AttemptReport:
        wait_for(lambda: self.reported(attempt) is not None, timeout=timeout,
                 message=f"report of {attempt}")
        result = self.reported(attempt)
        assert result is not None
        return result

    def data(self, ref: dict[str, Any] | None) -> bytes:
        """A result's bytes: carried in a report (small ones), else uploaded."""
        assert ref is not None
        with self.lock:
            for report in self.reports:
                for item in report.inline or ():
                    if item["sha256"] == ref["sha256"]:
                        return base64.b64decode(item["data"])
        held = self.sink.held[ref["sha256"]]
        return Path(held["path"]).read_bytes()


@pytest.fixture
def standin(grid: GridHarness, tmp_path: Path) -> Iterator[tuple[StandIn, WorkerHandle]]:
    topics = grid.topics
    bus = grid.bus(COORDINATOR, "coordinator", inbox=topics.coord_inbox, start=False)
    (tmp_path / "objects").mkdir()
    source = HashSource(tmp_path / "objects")
    sink = DirSink(tmp_path / "received", by_content=True)  # every stdout is "stdout"
    endpoint = TransferEndpoint(bus, sink=sink, source=source)
    wid = f"w{next(_ids)}"
    coord = StandIn(bus, source, sink, wid)
    bus.on_inbox(AttemptStarted.TYPE, coord.on_started, lane=Lane.JOBS)
    bus.on_inbox(AttemptReport.TYPE, coord.on_report, lane=Lane.JOBS)
    bus.subscribe(topics.worker_heartbeat(wid), coord.on_beat, lane=Lane.HEARTBEAT)
    bus.start(timeout=5)
    worker = grid.start_worker(wid, slots=4, wait_online=False)
    try:
        yield coord, worker
    finally:
        if worker.agent is not None:
            worker.agent.stop()
        endpoint.close()


def test_job_runs_with_inputs_stdin_outputs_and_env(
        standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, worker = standin
    data = b"line one\nline two\n" * 1000
    sha = coord.source.put(data)
    stdin = coord.source.put(b"from stdin\n")
    attempt = coord.assign(
        'mkdir -p out && wc -l < in/data.txt > out/count.txt && cat && '
        'echo "$XCLOUD_JOB_INDEX $XCLOUD_ATTEMPT_ID $GREETING" && echo oops >&2 && exit 3',
        inputs={"in/data.txt": sha}, stdin=stdin, outputs=["out/*.txt", "nothing*", "*"],
        env={"GREETING": "hi"}, index=7)
    report = coord.report(attempt)
    assert report.kind == "exit_nonzero"
    assert report.exit_code == 3
    assert coord.data(report.stdout) == f"from stdin\n7 {attempt} hi\n".encode()
    assert coord.data(report.stderr) == b"oops\n"
    assert [o["name"] for o in report.outputs or []] == ["out/count.txt"]
    assert coord.data((report.outputs or [])[0]) == b"2000\n"
    # It ended within STARTED_AFTER_S: no attempt.started, its start is in the report
    # (a command that runs longer sends one: test_kill_... waits for it).
    assert attempt not in coord.started
    assert report.started_at is not None
    assert report.ended_at is not None
    assert report.ended_at >= report.started_at
    agent = worker.agent
    assert agent is not None
    assert agent.cache is not None
    assert agent.cache.fetches == 2  # the input and stdin
    fetched = len(coord.source.fetches)
    # the same input again: served from the worker's cache, not fetched
    again = coord.assign("cat data.txt | wc -c", inputs={"data.txt": sha})
    second = coord.report(again)
    assert second.kind == "success"
    assert coord.data(second.stdout).strip() == str(len(data)).encode()
    assert len(coord.source.fetches) == fetched
    assert agent.cache.fetches == 2
    assert agent.cache.hits == 1
    assert f"sha256:{sha}" in (agent._collect_caps().shared or {}).get("data", [])
    # acknowledged attempts leave nothing on disk: no directory, no live record
    jobs = worker.state_dir / "jobs"
    wait_for(lambda: not any(p.is_dir() for p in jobs.iterdir()), timeout=10,
             message="attempt dirs removed")
    assert AttemptJournal(jobs / "attempts.journal").replay() == {}


def test_small_results_ride_in_the_report_and_large_ones_are_uploaded(
        standin: tuple[StandIn, WorkerHandle]) -> None:
    """stdout, stderr and outputs of at most INLINE_MAX_BYTES come base64 in the report
    (at most INLINE_MAX_FILES of them, the rest uploaded); a larger one is uploaded."""
    coord, _worker = standin
    big = INLINE_MAX_BYTES + 1
    attempt = coord.assign(
        f"head -c {big} /dev/zero | tr '\\0' x > big.txt; echo out; echo err >&2; "
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i > s$i.txt; done",
        outputs=["big.txt", "s*.txt"])
    report = coord.report(attempt)
    assert report.kind == "success"
    inline = {i["sha256"] for i in report.inline or ()}
    assert len(inline) == INLINE_MAX_FILES
    assert report.stdout is not None
    assert report.stdout["sha256"] in inline
    assert report.stderr is not None
    assert report.stderr["sha256"] in inline
    outputs = {o["name"]: o for o in report.outputs or ()}
    assert set(outputs) == {"big.txt", *(f"s{i}.txt" for i in range(1, 11))}
    assert outputs["big.txt"]["sha256"] not in inline  # over the size: uploaded
    assert outputs["big.txt"]["sha256"] in coord.sink.held
    uploaded = [n for n, o in outputs.items() if o["sha256"] not in inline]
    assert len(uploaded) == 1 + 10 - (INLINE_MAX_FILES - 2)  # the rest of the small ones
    assert all(outputs[n]["sha256"] in coord.sink.held for n in uploaded)
    assert coord.data(report.stdout) == b"out\n"
    assert coord.data(report.stderr) == b"err\n"
    assert coord.data(outputs["big.txt"]) == b"x" * big
    assert {coord.data(outputs[f"s{i}.txt"]) for i in range(1, 11)} == {
        f"{i}\n".encode() for i in range(1, 11)}


def test_a_coordinator_that_predates_inline_results_gets_them_uploaded(
        standin: tuple[StandIn, WorkerHandle]) -> None:
    """A coordinator older than ``inline`` refuses such a report ``invalid``: the worker
    uploads those results and sends the report again without them (not dropped: a
    volunteer's worker may be newer than its grid), and uploads from then on."""
    coord, _worker = standin
    coord.refuse_inline = True
    first = coord.assign("echo one; echo 1 > r.txt", outputs=["r.txt"])
    report = coord.report(first)
    assert report.kind == "success"
    assert not report.inline
    assert report.stdout is not None
    assert report.stdout["sha256"] in coord.sink.held  # uploaded
    assert coord.data(report.stdout) == b"one\n"
    assert coord.data((report.outputs or [])[0]) == b"1\n"
    second = coord.report(coord.assign("echo two"))
    assert not second.inline
    assert coord.data(second.stdout) == b"two\n"
    assert coord.inline_refused == 1


def test_missing_input_is_input_failed(standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, _ = standin
    attempt = coord.assign("true", inputs={"x": "0" * 64})
    report = coord.report(attempt)
    assert report.kind == "input_failed"
    assert "0000" in (report.error or "")


def test_wall_clock_and_kill(standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, _ = standin
    slow = coord.assign("sleep 30", wall_s=1)
    report = coord.report(slow)
    assert report.kind == "wall_clock"
    assert report.timed_out
    marker = f"60.{os.getpid()}{next(_ids)}"  # a sleep no other test runs
    victim = coord.assign(f"echo started; exec sleep {marker}")
    wait_for(lambda: any(victim in (b.attempts or []) for b in coord.beats), timeout=10,
             message="the attempt in a heartbeat")
    wait_for(lambda: victim in coord.started, timeout=10, message="attempt.started")
    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[-2:] == ["sleep", marker]]
    assert pids
    reply = coord.bus.request(coord.worker_inbox, JobKill(attempt=victim, reason="user"),
                              timeout=10)
    assert isinstance(reply.body, Ok)
    killed = coord.report(victim)
    assert killed.kind == "cancelled"
    assert coord.data(killed.stdout) == b"started\n"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


def test_report_is_resent_until_acknowledged(standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, worker = standin
    coord.refuse_reports = 1
    attempt = coord.assign("echo once")
    report = coord.report(attempt, timeout=30)  # the first send was refused: a resend
    assert report.kind == "success"
    assert len([r for r in coord.reports if r.attempt == attempt]) == 1
    wait_for(lambda: not (worker.state_dir / "jobs" / attempt).exists(), timeout=10,
             message="attempt dir removed")


def test_only_the_coordinator_assigns(grid: GridHarness,
                                      standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, worker = standin
    mallory = grid.bus("mallory", "client", inbox=grid.topics.client_inbox("mallory"))
    body = JobAssign(attempt=new_id("a"), job=new_id("j"), owner="mallory",
                     spec={"command": "touch /tmp/pwned"}, inputs=[], lease_s=30)
    with pytest.raises(RemoteError) as err:
        mallory.request(coord.worker_inbox, body, timeout=10)
    assert err.value.code == "forbidden"
    assert not (worker.state_dir / "jobs" / body.attempt).exists()


def test_restart_resends_reports_and_drops_interrupted_attempts(
        grid: GridHarness, standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, worker = standin
    coord.refuse_reports = 10**6  # the coordinator is "busy": nothing is acknowledged
    attempt = coord.assign("echo kept")
    journal = AttemptJournal(worker.state_dir / "jobs" / "attempts.journal")
    wait_for(lambda: journal.replay().get(attempt, {}).get("phase") == "reported",
             timeout=20, message="the report on disk")
    assert worker.agent is not None
    worker.agent.stop()
    # an attempt a killed worker was running: its record says so, nothing runs it now
    lost = AttemptRecord(attempt=new_id("a"), job=new_id("j"), owner="alice",
                         spec={"command": "true"}, inputs=[], phase="running")
    AttemptStore(worker.state_dir).save(lost)
    coord.refuse_reports = 0
    again = grid.start_worker(coord.wid, slots=4, wait_online=False)
    try:
        report = coord.report(attempt)
        assert report.kind == "success"
        assert coord.data(report.stdout) == b"kept\n"
        assert not (worker.state_dir / "jobs" / lost.attempt).exists()
        wait_for(lambda: any(b.attempts == [] for b in coord.beats[-3:]), timeout=10,
                 message="a heartbeat listing no attempt")
        assert all(lost.attempt not in (b.attempts or []) for b in coord.beats)
    finally:
        assert again.agent is not None
        again.agent.stop()


def test_an_attempt_never_runs_twice(standin: tuple[StandIn, WorkerHandle]) -> None:
    coord, worker = standin
    body = JobAssign(attempt=new_id("a"), job=new_id("j"), owner="alice",
                     spec={"command": "echo ran"}, inputs=[],
                     lease_s=30)
    first = coord.send_assign(body)
    again = coord.send_assign(body)  # while it runs (or once its report answered it)
    assert isinstance(first, Ok | AttemptReport)
    assert isinstance(again, Ok | AttemptReport)
    assert coord.report(body.attempt).kind == "success"
    # done: its directory gone and the runner's record of it too (the directory goes
    # first, just before: waiting for it alone raced the redelivery below)
    runner = worker.agent.jobs if worker.agent is not None else None
    assert runner is not None
    wait_for(lambda: not (worker.state_dir / "jobs" / body.attempt).exists()
             and runner._attempt(body.attempt) is None, timeout=10,
             message="the attempt done")
    with pytest.raises(RemoteError) as err:  # a late redelivery
        coord.bus.request(coord.worker_inbox, body, timeout=10)
    assert err.value.code == "conflict"
    assert len([r for r in coord.reports if r.attempt == body.attempt]) == 1


def test_concurrent_attempts_each_get_their_own_output(
        standin: tuple[StandIn, WorkerHandle]) -> None:
    """Attempts that start and end together (on the executor's reused threads, the slot
    gate's waiting line included) report exactly their own stdout and stderr."""
    coord, _worker = standin
    for round_ in range(5):
        attempts = [coord.assign(f'echo "out $XCLOUD_ATTEMPT_ID"; sleep 0.0{i}; '
                                 f'echo "err $XCLOUD_ATTEMPT_ID" >&2')
                    for i in range(6)]  # 4 slots + 2 waiting ([worker] job_queue)
        for attempt in attempts:
            report = coord.report(attempt)
            assert report.kind == "success", (round_, report)
            assert coord.data(report.stdout) == f"out {attempt}\n".encode()
            assert coord.data(report.stderr) == f"err {attempt}\n".encode()


def test_collect_outputs_makes_no_directory_when_nothing_matches(tmp_path: Path) -> None:
    """Most jobs ask for no outputs: their attempt gets no ``outputs`` directory (made and
    removed for nothing, an inode each on the worker's disk); one that has some gets it."""
    from worker.job_files import collect_outputs

    work = tmp_path / "work"
    work.mkdir()
    (work / "result.txt").write_text("42\n")
    dest = tmp_path / "outputs"
    assert collect_outputs(work, [], dest) == ([], [])
    assert collect_outputs(work, ["nothing*"], dest) == ([], [])
    assert not dest.exists()
    collected, problems = collect_outputs(work, ["*.txt"], dest)
    assert problems == []
    assert [(c.name, c.path.read_text()) for c in collected] == [("result.txt", "42\n")]
    assert dest.is_dir()


def test_a_short_jobs_accepted_report_answers_its_assignment(
        standin: tuple[StandIn, WorkerHandle], tmp_path: Path) -> None:
    """The ok to job.assign waits ``job_ack_wait_s`` (worker/assign_answers.py): a job
    reported and answered within it never sends its ok; one still running sends its ok
    when the wait ends; one whose report the coordinator does not accept sends it too."""
    coord, worker = standin
    runner = worker.agent.jobs if worker.agent is not None else None
    assert runner is not None
    answers = runner.answers
    answers.wait_s = 60.0  # longer than any of the quick job's steps, however slow
    quick = coord.assign("echo quick")
    assert coord.report(quick).kind == "success"
    wait_for(lambda: answers.spared == 1, timeout=10, message="its ok spared")
    assert answers.sent == 0
    answers.wait_s = 0.05
    gate = tmp_path / "gate"
    body = JobAssign(attempt=new_id("a"), job=new_id("j"), owner="alice",
                     spec={"command": f"while [ ! -e {gate} ]; do sleep 0.05; done"},
                     inputs=[], lease_s=30)
    assert isinstance(coord.send_assign(body), Ok)  # while it waits for the gate
    assert coord.reported(body.attempt) is None
    gate.touch()
    assert coord.report(body.attempt).kind == "success"
    coord.refuse_reports = 10**6  # the coordinator accepts no report: the ok still goes
    refused = JobAssign(attempt=new_id("a"), job=new_id("j"), owner="alice",
                        spec={"command": "true"}, inputs=[], lease_s=30)
    assert isinstance(coord.send_assign(refused), Ok)
    assert answers.sent == 2


def test_an_ok_goes_only_once_the_acceptance_is_durable_and_a_short_job_syncs_once(
        standin: tuple[StandIn, WorkerHandle], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance is written through, not synced: a short job whose report answers
    its assignment costs one fdatasync (the report's, which covers it); a longer job's
    held ok, and the ok to a repeated assign, go only after a sync of the journal."""
    coord, worker = standin
    runner = worker.agent.jobs if worker.agent is not None else None
    assert runner is not None
    journal = runner.store.journal
    events: list[str] = []
    real_sync, real_reply = os.fdatasync, runner.bus.reply

    def fdatasync(fd: int) -> None:
        if fd == journal._fd:
            events.append("sync")
        real_sync(fd)

    def reply(request: Incoming, message: Any) -> None:
        if isinstance(message, Ok) and "attempt" in (message.detail or {}):
            events.append("ok" if journal._synced >= journal._written else "ok, not durable")
        real_reply(request, message)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(runner.bus, "reply", reply)
    runner.answers.wait_s = 60.0
    assert coord.report(coord.assign("true")).kind == "success"
    assert events == ["sync"]  # the report's; no ok
    events.clear()
    runner.answers.wait_s = 0.05
    gate = tmp_path / "gate"
    body = JobAssign(attempt=new_id("a"), job=new_id("j"), owner="alice",
                     spec={"command": f"while [ ! -e {gate} ]; do sleep 0.05; done"},
                     inputs=[], lease_s=30)
    assert isinstance(coord.send_assign(body), Ok)
    assert events == ["sync", "ok"]
    events.clear()
    assert isinstance(coord.send_assign(body), Ok)  # repeated: ok again, durable first
    assert events in (["ok"], ["sync", "ok"])  # (a sync only if written since)
    gate.touch()
    assert coord.report(body.attempt).kind == "success"


def test_assignments_carried_in_a_reports_answer_run(
        standin: tuple[StandIn, WorkerHandle]) -> None:
    """``attempt.recorded`` may carry the next job.assign messages (worker/assign_answers.py):
    each runs as if it had come alone, and is reported."""
    coord, _worker = standin
    carried = [JobAssign(attempt=new_id("a"), job=new_id("j"), owner="alice",
                         spec={"command": f"echo carried {i}"}, inputs=[], lease_s=30)
               for i in range(2)]
    coord.carry = list(carried)
    first = coord.assign("echo first")
    assert coord.report(first).kind == "success"
    for i, body in enumerate(carried):
        report = coord.report(body.attempt)
        assert report.kind == "success"
        assert coord.data(report.stdout) == f"carried {i}\n".encode()
