"""Following a running job's output (``job.follow`` / ``job.output``, worker/job_follow.py,
client/job_follow.py, ``xcloud logs ID -f``) against a real coordinator, a real worker and
a real broker (amqtt and Mosquitto).

Liveness is proven with a gate: the job prints its first lines and then waits for a file
that the test creates only after the follower got those lines, so they can only have
arrived while the job was running.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker.bus import RemoteError
from client.api import Grid
from schemas.codec import encode, envelope
from schemas.job_messages import JobFollow, JobOutput
from schemas.messages import Ok
from tests.fixtures.grid import GridHarness, WorkerHandle
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import ALICE, alice
from tests.test_jobs_e2e import agent as e2e_agent
from worker.job_attempts import AttemptRecord
from worker.job_follow import BURST_CHUNKS, CHUNK_BYTES, JobFollows
from worker.job_runner import Attempt

ONE_BROKER = pytest.mark.parametrize("broker_kind", ["mosquitto"], indirect=True)


def agent(grid: GridHarness, name: str, executor: str = "process") -> WorkerHandle:
    """A WorkerAgent in this process (docker: busybox). Its heartbeat is 1 s (lost after
    2 s of silence), not the grid's 0.2 s: these tests are about output, and a loaded
    machine must not get the worker declared lost mid-job (a retry changes the output)."""
    return e2e_agent(grid, name, executor=executor, heartbeat_s=1.0)


def gated(gate: Path) -> str:
    """A job: two lines (one per stream), then waits (at most 30 s) for ``gate``, then
    more lines over about a second; exit 0."""
    return (f"echo first; echo err-first >&2; n=0; while [ ! -e {gate} ]; do sleep 0.1; "
            "n=$((n+1)); [ $n -gt 300 ] && exit 3; done; "
            "for i in 1 2 3 4 5; do echo line$i; echo err$i >&2; sleep 0.2; done; "
            "seq 1 20000")


def gated_job(grid: GridHarness, tmp_path: Path, *others: str
              ) -> tuple[JobFollows, Grid, Path, str]:
    """A jobs coordinator, worker w1 in this process, and alice's gated job submitted:
    (w1's follows, alice's client, the gate, the job id). Principals first (``others``
    too): adding one later reloads the broker's credentials, which can stall a loaded
    machine for longer than the tests' heartbeat tolerance."""
    grid.add_principals((ALICE, "client"), *((o, "client") for o in others))
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1")
    assert worker.agent is not None
    assert worker.agent.jobs is not None
    client = alice(grid)
    gate = tmp_path / "gate"
    return worker.agent.jobs.follows, client, gate, client.submit(gated(gate), wall=60).job


def running_attempt(client: object, job: str) -> tuple[str, str]:
    """The job's running attempt (id, worker). Its output may come before it counts as
    running: the worker holds its ``ok`` (which makes the attempt running) up to
    ``job_ack_wait_s`` and sends it once the attempt is durable, so this waits for it."""
    def found() -> tuple[str, str] | None:
        reply = client.jobs.show(job)  # type: ignore[attr-defined]
        return next(((str(a["id"]), str(a["worker"])) for a in reply.attempts
                     if a["kind"] == "running"), None)
    return wait_for(found, timeout=10, message=f"job {job} has no running attempt")


def test_follow_is_live_complete_and_owner_only(grid: GridHarness, tmp_path: Path) -> None:
    follows, client, gate, job = gated_job(grid, tmp_path, "bob")

    got: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    stream: Iterator[tuple[str, bytes]] = client.jobs.follow(job)
    while b"first\n" not in got["stdout"]:
        name, data = next(stream)
        got[name] += data
    assert not gate.exists()  # the job is blocked on the gate: it still runs
    attempt, wid = running_attempt(client, job)
    assert wid == "w1"
    assert follows.active(attempt) == 1

    # Somebody else (not the job's owner) is refused by the worker itself.
    bob = grid.client("bob", "client")
    with pytest.raises(RemoteError) as refused:
        bob.bus.request(bob.topics.worker_inbox(wid), JobFollow(attempt=attempt, follow="b1"))
    assert refused.value.code == "forbidden"
    # The owner, beyond the followers' limit, is told busy.
    follows.max_per_attempt = 1
    with pytest.raises(RemoteError) as busy:
        client.bus.request(client.topics.worker_inbox(wid),
                           JobFollow(attempt=attempt, follow="a2"))
    assert busy.value.code == "busy"
    # An attempt that does not run there: not_found.
    with pytest.raises(RemoteError) as unknown:
        client.bus.request(client.topics.worker_inbox(wid),
                           JobFollow(attempt="a-0000000000000000", follow="a3"))
    assert unknown.value.code == "not_found"

    gate.touch()
    for name, data in stream:
        got[name] += data
    result = client.jobs.result(job)
    assert result.ok, result
    assert bytes(got["stdout"]) == result.stdout
    assert bytes(got["stderr"]) == result.stderr
    assert result.stdout.startswith(b"first\nline1\n")
    assert result.stdout.endswith(b"20000\n")
    assert result.stderr == b"err-first\n" + b"".join(b"err%d\n" % i for i in range(1, 6))
    wait_for(lambda: follows.active() == 0, timeout=10, message="the follow ended")
    # Following an ended job gives its stored output, once.
    again: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for name, data in client.jobs.follow(job):
        again[name] += data
    assert again == {"stdout": result.stdout, "stderr": result.stderr}


@ONE_BROKER
def test_a_follower_that_leaves_stops_the_workers_stream(grid: GridHarness,
                                                         tmp_path: Path) -> None:
    """Closing the follow (Ctrl-C in `xcloud logs -f`) tells the worker at once: its
    follow ends while the job still runs, not an hour later."""
    follows, client, gate, job = gated_job(grid, tmp_path)
    stream = client.jobs.follow(job)
    first = b""
    while b"first\n" not in first:
        name, data = next(stream)
        first += data if name == "stdout" else b""
    attempt, _wid = running_attempt(client, job)
    assert follows.active(attempt) == 1
    stream.close()  # the follower leaves
    wait_for(lambda: follows.active(attempt) == 0, timeout=10,
             message="the worker's follow ended when its follower left")
    assert client.jobs.show(job).job["state"] == "running"  # the job goes on
    gate.touch()
    assert client.jobs.future(job).result(timeout=60).ok


@ONE_BROKER
def test_cli_logs_follow(grid: GridHarness, tmp_path: Path) -> None:
    token = grid.token(ALICE, "client")
    start_jobs_coordinator(grid)
    agent(grid, "w1")
    client = alice(grid)
    gate = tmp_path / "gate"
    job = client.submit(gated(gate), wall=60).job
    env = grid.subprocess_env(XCLOUD_HOME=str(tmp_path / "home"), XCLOUD_BUS_PRINCIPAL=ALICE,
                              XCLOUD_LOG_LEVEL="WARNING",
                              XCLOUD_BUS_TOKEN=token, XCLOUD_BUS_URL=grid.url,
                              XCLOUD_BUS_ROOT=grid.root)
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "logs", job, "-f"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        wait_for(lambda: lines, timeout=60, message="`xcloud logs -f` printed a line")
        assert lines == [b"first\n"]
        assert not gate.exists()  # printed while the job waits on the gate
        gate.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    result = client.jobs.result(job)
    assert b"first\n" + out == result.stdout
    assert err == result.stderr


# -- the worker's side alone (worker/job_follow.py): offsets, the end, the time limit ----


class _Bus:
    """What JobFollows uses of a Bus; every message sent is encoded (schema-checked)."""

    def __init__(self) -> None:
        self.sent: list[JobOutput] = []
        self.replies: list[object] = []

    def reply_inbox(self, incoming: object) -> str:  # noqa: ARG002
        return "r/client/alice/inbox"

    def reply(self, incoming: object, body: object) -> None:  # noqa: ARG002
        self.replies.append(body)

    def reply_error(self, incoming: object, code: str, message: str,  # noqa: ARG002
                    detail: object = None) -> None:  # noqa: ARG002
        self.replies.append(("error", code))

    def send(self, inbox: str, body: JobOutput) -> None:  # noqa: ARG002
        encode(envelope(body))  # raises if the message breaks job.output.json
        self.sent.append(body)


def _follows(tmp_path: Path, phase: str, *, poll_s: float = 0.01,
             follow_s: float = 60.0, coordinator: str | None = None,
             coordinator_follow_s: float = 60.0) -> tuple[JobFollows, _Bus, Attempt]:
    directory = tmp_path / "a-1"
    directory.mkdir()
    (directory / "stdout").write_bytes(b"0123456789" * 100_000)  # 1,000,000 bytes
    (directory / "stderr").write_bytes(b"oops\n")
    attempt = Attempt(AttemptRecord(attempt="a-1", job="j-1", owner=ALICE,
                                    spec={"command": "true"}, inputs=[], phase=phase))
    bus = _Bus()
    follows = JobFollows(bus, lambda a: attempt if a == "a-1" else None,  # type: ignore[arg-type]
                         lambda a: tmp_path / a, poll_s=poll_s, follow_s=follow_s,
                         coordinator=coordinator, coordinator_follow_s=coordinator_follow_s)
    return follows, bus, attempt


def _ask(follows: JobFollows, sender: str, stdout_offset: int | None = None,
         stderr_offset: int | None = None) -> None:
    incoming = SimpleNamespace(sender=sender, body=JobFollow(
        attempt="a-1", follow="f1", stdout_offset=stdout_offset, stderr_offset=stderr_offset))
    follows.on_follow(incoming)  # type: ignore[arg-type]


def test_worker_follow_from_offsets_to_the_outcome(tmp_path: Path) -> None:
    follows, bus, attempt = _follows(tmp_path, "finished")
    attempt.record.result = {"kind": "exit_nonzero", "exit_code": 3}
    _ask(follows, "mallory")
    assert bus.replies == [("error", "forbidden")]
    _ask(follows, ALICE, stdout_offset=950_000, stderr_offset=2)
    wait_for(lambda: follows.active() == 0 and bus.sent, message="the follow ended")
    follows.close()
    assert isinstance(bus.replies[-1], Ok)
    out = [m for m in bus.sent if m.stream == "stdout" and m.data]
    assert [m.offset for m in out] == [950_000]  # one chunk of the 50,000 left
    assert len(base64.b64decode(out[0].data)) == 50_000
    err = [m for m in bus.sent if m.stream == "stderr"]
    assert [(m.offset, base64.b64decode(m.data)) for m in err] == [(2, b"ps\n")]
    last = bus.sent[-1]
    assert (last.eof, last.kind, last.exit_code) == (True, "exit_nonzero", 3)
    assert [m.seq for m in bus.sent] == list(range(len(bus.sent)))


def test_worker_follow_is_bounded_in_followers_and_chunks(tmp_path: Path) -> None:
    follows, bus, _attempt = _follows(tmp_path, "running", poll_s=30.0)
    follows.max_per_attempt = 1
    _ask(follows, ALICE)
    _ask(follows, ALICE)
    assert isinstance(bus.replies[0], Ok)
    assert bus.replies[1] == ("error", "busy")
    # one poll's burst (the file holds more), then it waits for the next poll
    wait_for(lambda: len(bus.sent) >= BURST_CHUNKS, message="the first burst")
    follows.close()  # the worker stops: the follow ends at once, with a reason
    assert follows.active() == 0
    data = [m for m in bus.sent if not m.eof]
    assert [m.offset for m in data] == [i * CHUNK_BYTES for i in range(BURST_CHUNKS)]
    assert all(m.stream == "stdout" for m in data)
    assert bus.sent[-1].eof
    assert bus.sent[-1].kind is None
    assert bus.sent[-1].reason


def test_worker_follow_ends_at_its_time_limit(tmp_path: Path) -> None:
    follows, bus, _attempt = _follows(tmp_path, "running", follow_s=0.0)
    _ask(follows, ALICE)
    wait_for(lambda: follows.active() == 0, message="the follow ended at its time limit")
    follows.close()
    last = bus.sent[-1]
    assert last.eof
    assert last.kind is None
    assert "ask again" in (last.reason or "")


def test_worker_follow_lets_the_coordinator_relay_and_nobody_else(tmp_path: Path) -> None:
    """The coordinator principal may follow any attempt (it relays the output to the
    job's dashboard page), for a short while each time; other non-owners, an admin
    included, are refused."""
    follows, bus, _attempt = _follows(tmp_path, "running", coordinator="coord-1",
                                      coordinator_follow_s=0.0)
    _ask(follows, "mallory")
    _ask(follows, "admin")
    assert bus.replies == [("error", "forbidden"), ("error", "forbidden")]
    _ask(follows, "coord-1")
    assert isinstance(bus.replies[-1], Ok)
    # its follow ends at the coordinator's (short) limit, not the owner's hour
    wait_for(lambda: follows.active() == 0, message="the coordinator's follow ended")
    follows.close()
    assert bus.sent[-1].eof
    assert bus.sent[-1].kind is None


def test_worker_follow_stops_when_its_own_follower_says_so(tmp_path: Path) -> None:
    follows, bus, _attempt = _follows(tmp_path, "running", poll_s=30.0)
    _ask(follows, ALICE)
    assert isinstance(bus.replies[-1], Ok)
    wait_for(lambda: len(bus.sent) >= BURST_CHUNKS, message="the first burst")

    def stop(sender: str, follow: str = "f1") -> None:
        follows.on_follow(SimpleNamespace(  # type: ignore[arg-type]
            sender=sender, body=JobFollow(attempt="a-1", follow=follow, stop=True)))

    stop("mallory")  # not hers: nothing stops
    assert bus.replies[-1:] == [("error", "not_found")]
    stop(ALICE, "f2")  # no such follow
    assert bus.replies[-1:] == [("error", "not_found")]
    assert follows.active() == 1
    sent = len(bus.sent)
    stop(ALICE)
    assert isinstance(bus.replies[-1], Ok)
    # at once, not at the next 30 s poll, and with nothing more sent: nobody reads it
    wait_for(lambda: follows.active() == 0, timeout=5, message="the follow stopped")
    assert len(bus.sent) == sent
    follows.close()


@ONE_BROKER
@pytest.mark.parametrize("executor_kind", ["docker"], indirect=True)
def test_follow_a_docker_job(grid: GridHarness, executor_kind: str) -> None:
    grid.add_principals((ALICE, "client"))
    start_jobs_coordinator(grid)
    worker = agent(grid, "w1", executor=executor_kind)
    assert worker.agent is not None
    assert worker.agent.jobs is not None
    client = alice(grid)
    # the gate lives in the work dir (the container's cwd), created once the line came
    job = client.submit(gated(Path("gate")), wall=120).job
    got = {"stdout": b"", "stderr": b""}
    stream = client.jobs.follow(job)
    while b"first\n" not in got["stdout"]:
        name, data = next(stream)
        got[name] += data
    attempt, _wid = running_attempt(client, job)
    (worker.agent.jobs.store.workdir(attempt) / "gate").touch()
    for name, data in stream:
        got[name] += data
    result = client.jobs.result(job)
    assert result.ok, result
    assert got == {"stdout": result.stdout, "stderr": result.stderr}
