"""Remote commands end to end over a real broker (embedded amqtt and Mosquitto), on both
executors (process and docker).

The harness plays every part with real buses: a ``coordinator`` principal that opens and
closes reservations and publishes its grant key (retained), the worker's ExecService
with an executor, and two clients (``alice`` holds the reservation, ``mallory`` does
not).

Every grid test runs on (amqtt, process), (amqtt, docker) and (mosquitto, process); the
tests decorated with ``@docker_on_mosquitto`` also on (mosquitto, docker). Docker
sessions use the busybox image (fast); each grid labels its containers with a worker
id of its own (``xcloud.worker``), removes them when it closes, and the module checks
that none is left (``docker_leak_check``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.acl import Principal, Role
from broker.bus import Bus, Incoming, Lane, RequestTimeout
from broker.config import BusConfig, WorkerConfig
from broker.credentials import hash_token
from broker.embedded import BrokerSettings, EmbeddedBroker
from broker.mosquitto import write_mosquitto_files
from schemas.codec import Envelope
from schemas.grants import public_key_to_text, sign_grant
from schemas.messages import (
    Body,
    CoordPubkey,
    Error,
    ExecExit,
    ExecList,
    ExecListReply,
    ExecLogs,
    ExecLogsReply,
    ExecOutput,
    ExecReport,
    ExecSignal,
    ExecStart,
    ExecStarted,
    Ok,
    ReservationClose,
    ReservationOpen,
)
from schemas.topics import Topics
from tests.executors.harness import marked_processes
from tests.fixtures.leaks import record_thread_starts
from tests.fixtures.services import BUSYBOX_IMAGE, wait_for
from worker.exec_service import ExecService
from worker.executors import Executor, ExecutorContext, make_executor
from worker.executors.base import SessionHandle
from worker.executors.docker import LABEL_WORKER, container_of
from worker.output import OutputStreamer

ROOT = "xcloud"
WID = "w1"
# Docker containers of this module are labelled xcloud.worker=<DOCKER_PREFIX>-<grid>.
DOCKER_PREFIX = f"test-exec-{uuid.uuid4().hex[:6]}"
DOCKER_IMAGE = BUSYBOX_IMAGE
TOPICS = Topics(ROOT)
PRINCIPALS = {
    "coordinator": (Role.COORDINATOR, "coord-token-0123456789"),
    WID: (Role.WORKER, "worker-token-0123456789"),
    "alice": (Role.CLIENT, "alice-token-0123456789"),
    "mallory": (Role.CLIENT, "mallory-token-0123456789"),
}


# --------------------------------------------------------------------------- brokers


def _authenticate(user: str, token: str) -> Principal | None:
    entry = PRINCIPALS.get(user)
    if entry is None or entry[1] != token:
        return None
    return Principal(user, entry[0])


def docker_on_mosquitto(test: Callable[..., None]) -> Callable[..., None]:
    """Also run this test on (mosquitto, docker): the docker smoke subset on Mosquitto."""
    test.docker_on_mosquitto = True  # type: ignore[attr-defined]
    return test


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every grid test over (broker, executor), see the module docstring."""
    if "backend" not in metafunc.fixturenames:
        return
    docker = pytest.mark.docker
    params = [pytest.param(("amqtt", "process"), id="amqtt-process"),
              pytest.param(("amqtt", "docker"), id="amqtt-docker", marks=docker),
              pytest.param(("mosquitto", "process"), id="mosquitto-process")]
    if getattr(metafunc.function, "docker_on_mosquitto", False):
        params.append(pytest.param(("mosquitto", "docker"), id="mosquitto-docker",
                                   marks=docker))
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker, executor) of this test run."""
    value: tuple[str, str] = request.param
    return value


@pytest.fixture
def executor_kind(backend: tuple[str, str], request: pytest.FixtureRequest) -> str:
    """``process`` or ``docker``; docker needs the engine and the busybox image (skip, or
    fail under XCLOUD_REQUIRE_SERVICES=1) and arms the module's container leak check."""
    if backend[1] == "docker":
        request.getfixturevalue("docker_image")(DOCKER_IMAGE)
        request.getfixturevalue("docker_leak_check")
    return backend[1]


def docker_containers(engine: Any, worker_id: str | None = None) -> list[str]:
    """Containers (running or not) labelled by this module, or by one grid of it."""
    found = engine.api.containers(all=True, filters={"label": LABEL_WORKER})
    return [str(c["Id"]) for c in found
            if (c.get("Labels") or {}).get(LABEL_WORKER, "").startswith(worker_id or
                                                                         DOCKER_PREFIX)]


@pytest.fixture(scope="module")
def docker_leak_check(docker_engine: Any) -> Iterator[None]:
    """At the end of the module: no container of this module may be left."""
    yield
    leaked = docker_containers(docker_engine)
    for cid in leaked:
        docker_engine.api.remove_container(cid, force=True)
    assert not leaked, f"session containers left behind: {leaked}"


@pytest.fixture
def broker_url(backend: tuple[str, str], request: pytest.FixtureRequest,
               tmp_path: Path) -> Iterator[str]:
    """A broker with xcloud's principals and ACL: the embedded one, or real Mosquitto."""
    if backend[0] == "amqtt":
        broker = EmbeddedBroker(BrokerSettings(port=0), _authenticate)
        broker.start_in_thread()
        try:
            yield broker.url
        finally:
            broker.stop_in_thread()
        return
    factory = request.getfixturevalue("mosquitto_factory")
    principals = [(Principal(user, role), hash_token(token))
                  for user, (role, token) in PRINCIPALS.items()]
    passwd, acl = write_mosquitto_files(principals, ROOT, tmp_path / "mosquitto-auth")
    yield factory(allow_anonymous=False, password_file=passwd, acl_file=acl).url


# ---------------------------------------------------------------------------- clients


@dataclass
class Run:
    """What one client saw of one command."""

    outputs: dict[int, ExecOutput] = field(default_factory=dict)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    exits: list[ExecExit] = field(default_factory=list)
    exit_at: float = 0.0
    order: list[int] = field(default_factory=list)

    @property
    def exit(self) -> ExecExit | None:
        return self.exits[0] if self.exits else None

    def complete(self) -> bool:
        last = self.exit.last_seq if self.exit else None
        return last is not None and all(s in self.outputs for s in range(last + 1))

    def data(self, stream: str | None = None) -> bytes:
        return b"".join(base64.b64decode(o.data) for _, o in sorted(self.outputs.items())
                        if stream is None or o.stream == stream)


class Client:
    """A client principal's bus that records exec.output / exec.exit per exec id."""

    def __init__(self, url: str, principal: str) -> None:
        self.principal = principal
        self.bus = make_bus(url, principal, TOPICS.client_inbox(principal))
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()
        self.bus.on_inbox(ExecOutput.TYPE, self._on_output, lane=Lane.EXEC)
        self.bus.on_inbox(ExecExit.TYPE, self._on_output, lane=Lane.EXEC)
        self.bus.start()

    def run_of(self, exec_id: str) -> Run:
        with self.lock:
            return self.runs.setdefault(exec_id, Run())

    def _on_output(self, incoming: Incoming) -> None:
        body = incoming.body
        now = time.monotonic()
        run = self.run_of(body.exec_id)
        with self.lock:
            if isinstance(body, ExecOutput):
                run.outputs.setdefault(body.seq, body)
                run.arrivals.append((now, body.seq))
                run.order.append(body.seq)
            else:
                run.exits.append(body)
                run.exit_at = now

    def request(self, body: Body, timeout: float = 10.0) -> Any:
        reply: Envelope[Any] = self.bus.request(TOPICS.worker_inbox(WID), body,
                                                timeout=timeout, raise_errors=False)
        return reply.body


def make_bus(url: str, principal: str, inbox: str | None) -> Bus:
    return Bus(BusConfig(url=url, principal=principal, token=PRINCIPALS[principal][1],
                         root=ROOT, request_timeout_s=10.0),
               client_id=f"{principal}-{uuid.uuid4().hex[:6]}", inbox=inbox)


# ------------------------------------------------------------------------------ grid


class Grid:
    """Coordinator, worker (ExecService + executor) and clients on one broker."""

    def __init__(self, url: str, state_dir: Path, key: Ed25519PrivateKey,
                 worker_config: WorkerConfig | None = None, publish_key: bool = True,
                 executor_kind: str = "process") -> None:
        self.url = url
        self.state_dir = state_dir
        self.key = key
        self.executor_kind = executor_kind
        self.config = worker_config or WorkerConfig(slots=2)
        if executor_kind == "docker":
            self.config = dataclasses.replace(self.config, docker_image=DOCKER_IMAGE)
        # Labels this grid's containers; the same across a worker restart (recovery).
        self.docker_wid = f"{DOCKER_PREFIX}-{uuid.uuid4().hex[:6]}"
        self.reports: list[ExecReport] = []
        self.coord = make_bus(url, "coordinator", TOPICS.coord_inbox)
        self.coord.on_inbox(ExecReport.TYPE, lambda inc: self.reports.append(inc.body))
        self.coord.start()
        if publish_key:
            self.publish_key(key)
        self.worker_bus: Bus | None = None
        self.service: ExecService | None = None
        self.executor: Executor | None = None
        self.old_executors: list[Executor] = []  # of "crashed" workers, closed at the end
        self.start_worker()
        self.alice = Client(url, "alice")
        self.mallory = Client(url, "mallory")

    def publish_key(self, key: Ed25519PrivateKey) -> None:
        body = CoordPubkey(alg="ed25519", key=public_key_to_text(key.public_key()))
        self.coord.publish(TOPICS.coord_pubkey, body, qos=1, retain=True).wait_for_publish(5)

    @property
    def docker(self) -> bool:
        return self.executor_kind == "docker"

    def start_worker(self) -> ExecService:
        if self.executor is not None:
            self.old_executors.append(self.executor)
        self.worker_bus = make_bus(self.url, WID, TOPICS.worker_inbox(WID))
        # Built as the agent builds it: through the registry.
        self.executor = make_executor(self.executor_kind, ExecutorContext(
            self.config, self.state_dir, self.docker_wid, kill_grace_s=2.0))
        self.service = ExecService(self.worker_bus, TOPICS, WID, self.config, self.executor,
                                   self.state_dir, kill_grace_s=2.0)
        self.service.register()
        self.worker_bus.start()
        # CONNACK does not mean the inbox subscription is in place: probe until answered.
        wait_for(self._worker_answers, message="the worker does not answer")
        return self.service

    def _worker_answers(self) -> bool:
        try:
            reply = self.coord.request(TOPICS.worker_inbox(WID),
                                       ReservationClose(reservation="probe"), timeout=0.5)
        except RequestTimeout:
            return False
        return isinstance(reply.body, Ok)

    def stop_worker(self, remove_sessions: bool = False) -> None:
        """Stop the worker like the agent does; ``remove_sessions`` also removes what a
        stopped worker keeps for its next run (session containers), as a test must."""
        if self.service is not None:
            self.service.close()
        if self.executor is not None:
            if remove_sessions:
                self.executor.cleanup_orphans(set())
            self.executor.close()
        for old in self.old_executors:
            old.close()
        if self.worker_bus is not None:
            self.worker_bus.stop()

    def close(self) -> None:
        self.stop_worker(remove_sessions=True)
        for bus in (self.alice.bus, self.mallory.bus, self.coord):
            bus.stop()

    # -- coordinator side --------------------------------------------------------

    def open(self, rid: str | None = None, client: str = "alice",
             limits: dict[str, Any] | None = None) -> str:
        rid = rid or f"r-{uuid.uuid4().hex[:8]}"
        reply = self.coord.request(TOPICS.worker_inbox(WID), ReservationOpen(
            reservation={"id": rid, "worker": WID, "client": client,
                         "expires_at": time.time() + 60}, limits=limits), timeout=10)
        assert isinstance(reply.body, Ok), reply.body
        return rid

    def close_reservation(self, rid: str) -> Any:
        return self.coord.request(TOPICS.worker_inbox(WID),
                                  ReservationClose(reservation=rid, reason="released"),
                                  timeout=20).body

    def grant(self, rid: str, client: str = "alice", worker: str = WID,
              exp: float | None = None, key: Ed25519PrivateKey | None = None) -> str:
        return sign_grant(key or self.key, rid=rid, client=client, worker=worker,
                          exp=time.time() + 60 if exp is None else exp)

    def container_of(self, rid: str) -> str | None:
        """The container of an open session (docker; None for process)."""
        assert self.service is not None
        session = self.service.session(rid)
        assert session is not None
        return container_of(session.handle) if self.docker else None

    @staticmethod
    def abort_streams(service: ExecService) -> None:
        """End the output threads of a crashed run's commands."""
        for session in service.sessions.all():
            for ex in session.execs.values():
                ex.streamer.abort()

    def workdir(self, rid: str) -> Path:
        """The session's work dir on the host."""
        assert self.service is not None
        return self.service.store.workdir(rid)

    def seen_workdir(self, rid: str) -> str:
        """The work dir as the session's commands see it (docker: the bind mount)."""
        return "/work" if self.docker else str(self.workdir(rid))

    # -- client side -------------------------------------------------------------

    def start(self, rid: str, command: str, mode: str = "output", exec_id: str | None = None,
              client: Client | None = None, grant: str | None = None, **kw: Any) -> Any:
        client = client or self.alice
        exec_id = exec_id or uuid.uuid4().hex[:10]
        client.run_of(exec_id)
        return client.request(ExecStart(grant=grant or self.grant(rid), exec_id=exec_id,
                                        command=command, mode=mode, **kw))

    def run(self, rid: str, command: str, timeout: float = 15.0, **kw: Any) -> Run:
        started = self.start(rid, command, **kw)
        assert isinstance(started, ExecStarted), started
        run = self.alice.run_of(started.exec_id)
        wait_for(run.complete, timeout=timeout, message=f"{command!r} did not complete")
        return run


@pytest.fixture
def grid_factory(broker_url: str, executor_kind: str, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Grid]]:
    grids: list[Grid] = []
    key = Ed25519PrivateKey.generate()
    engine = request.getfixturevalue("docker_engine") if executor_kind == "docker" else None

    def make(**kw: Any) -> Grid:
        g = Grid(broker_url, tmp_path / f"worker-state-{len(grids)}", key,
                 executor_kind=executor_kind, **kw)
        grids.append(g)
        if kw.get("publish_key", True):
            assert g.service is not None
            assert g.service.key_ready.wait(10), "the worker never got the coordinator key"
        return g

    yield make
    for g in grids:
        g.close()
    if engine is not None:
        for g in grids:
            assert not docker_containers(engine, g.docker_wid), "session containers left"


@pytest.fixture
def grid(grid_factory: Callable[..., Grid]) -> Grid:
    return grid_factory()


@pytest.fixture(autouse=True)
def no_leaked_processes(tmp_path: Path) -> Iterator[None]:
    yield
    wait_for(lambda: not marked_processes(tmp_path), timeout=10,
             message="commands left running after the test")


# ------------------------------------------------------------------------------ tests


@docker_on_mosquitto
def test_output_exit_code_and_report(grid: Grid) -> None:
    rid = grid.open()
    run = grid.run(rid, "echo hi; echo err >&2; exit 3")
    assert run.data("stdout") == b"hi\n"
    assert run.data("stderr") == b"err\n"
    assert run.exit is not None
    assert run.exit.exit_code == 3
    assert run.exit.signal is None
    assert sorted(run.outputs) == list(range(run.exit.last_seq + 1))
    assert run.exit.output_bytes == 7
    assert not run.exit.truncated
    assert not run.exit.timed_out
    wait_for(lambda: grid.reports, message="no exec.report")
    report = grid.reports[-1]
    assert (report.reservation, report.client, report.exit_code) == (rid, "alice", 3)
    assert report.command == "echo hi; echo err >&2; exit 3"
    assert report.mode == "output"
    assert report.output_bytes == 7


def test_pipes_and_quotes(grid: Grid) -> None:
    rid = grid.open()
    run = grid.run(rid, "printf 'a b\\n' | tr a-z A-Z")
    assert run.data() == b"A B\n"
    assert run.exit is not None
    assert run.exit.exit_code == 0


@docker_on_mosquitto
def test_output_arrives_while_the_command_runs(grid: Grid) -> None:
    rid = grid.open()
    run = grid.run(rid, "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.1; done")
    assert run.data() == b"".join(b"line %d\n" % i for i in range(1, 11))
    assert len(run.outputs) >= 5, "lines were not streamed one by one"
    first_at = min(t for t, _ in run.arrivals)
    assert first_at < run.exit_at - 0.5, "output only arrived at the end"


@docker_on_mosquitto
def test_ctrl_c_interrupts(grid: Grid) -> None:
    rid = grid.open()
    # ``exec``: with "echo ready; sleep 30" an INT that lands while bash forks sleep is
    # swallowed by the child before it execs (bash defers it), and sleep runs its 30 s.
    started = grid.start(rid, "echo ready; exec sleep 30")
    run = grid.alice.run_of(started.exec_id)
    wait_for(lambda: run.data() == b"ready\n", message="command did not start")
    t0 = time.monotonic()
    reply = grid.alice.request(ExecSignal(grant=grid.grant(rid), exec_id=started.exec_id,
                                          signal="INT"))
    assert isinstance(reply, Ok), reply
    wait_for(run.complete, timeout=5, message="no exec.exit after INT")
    assert run.exit is not None
    assert run.exit.signal == signal.SIGINT
    assert run.exit.exit_code is None
    assert time.monotonic() - t0 < 5


def test_background_list_logs_follow_and_kill(grid: Grid) -> None:
    rid = grid.open()
    command = "echo one; while [ ! -e go ]; do sleep 0.05; done; echo two; sleep 30"
    started = grid.start(rid, command, mode="background", exec_id="bg1")
    assert isinstance(started, ExecStarted)
    assert started.pid
    grant = grid.grant(rid)

    listed = grid.alice.request(ExecList(grant=grant))
    assert isinstance(listed, ExecListReply)
    [entry] = listed.execs
    assert (entry["exec_id"], entry["state"], entry["mode"]) == ("bg1", "running", "background")

    def logs(**kw: Any) -> ExecLogsReply:
        reply = grid.alice.request(ExecLogs(grant=grant, exec_id="bg1", **kw))
        assert isinstance(reply, ExecLogsReply), reply
        return reply

    wait_for(lambda: logs().chunks, message="no output kept")
    reply = logs()
    assert reply.state == "running"
    assert reply.first_seq == 0
    assert base64.b64decode(reply.chunks[0]["data"]) == b"one\n"
    run = grid.alice.run_of("bg1")
    assert not run.outputs, "a background command streamed output"

    followed = logs(follow=True)
    assert followed.following is True
    (grid.workdir(rid) / "go").touch()
    wait_for(lambda: run.data() == b"two\n", message="followed output did not stream")
    assert min(run.outputs) == len(followed.chunks)  # seq continues after the reply

    killed = grid.alice.request(ExecSignal(grant=grant, exec_id="bg1", signal="KILL"))
    assert isinstance(killed, Ok)
    wait_for(lambda: run.exit, message="follower got no exec.exit")
    assert run.exit is not None
    assert run.exit.last_seq == 1  # seq 0 came in the reply
    assert run.exit.signal == signal.SIGKILL

    after = logs(from_seq=1)
    assert after.state == "exited"
    assert after.exit
    assert after.exit["signal"] == 9
    assert [c["seq"] for c in after.chunks] == [1]
    listed = grid.alice.request(ExecList(grant=grant))
    assert listed.execs[0]["state"] == "exited"
    missing = grid.alice.request(ExecLogs(grant=grant, exec_id="nope"))
    assert isinstance(missing, Error)
    assert missing.code == "not_found"


def test_timeout(grid: Grid) -> None:
    rid = grid.open()
    run = grid.run(rid, "echo started; sleep 30", timeout_s=0.5)
    assert run.exit is not None
    assert run.exit.timed_out is True
    assert run.exit.signal == signal.SIGTERM
    assert run.data() == b"started\n"


def test_output_cap_truncates(grid: Grid) -> None:
    rid = grid.open()
    run = grid.run(rid, "head -c 300000 /dev/zero; echo done", max_output_bytes=1000)
    assert run.exit is not None
    assert run.exit.truncated is True
    assert run.data() == bytes(1000)
    assert run.exit.output_bytes == 1000
    assert run.exit.exit_code == 0


@docker_on_mosquitto
def test_cd_persists(grid: Grid) -> None:
    rid = grid.open()
    grid.run(rid, "mkdir d; cd d")
    run = grid.run(rid, "pwd")
    # docker: /work/d (the bind mount); process: <host work dir>/d
    assert run.data().decode() == grid.seen_workdir(rid) + "/d\n"
    assert (grid.workdir(rid) / "d").is_dir()


@docker_on_mosquitto
def test_user_home_and_start_dir(grid: Grid) -> None:
    """Executor-specific: who runs the commands, their HOME and where they start."""
    rid = grid.open()
    run = grid.run(rid, "id -u; echo $HOME; pwd; echo $XCLOUD_RESERVATION")
    uid = 1000 if grid.docker else os.getuid()  # docker: docker_user 1000:1000, never root
    home = grid.seen_workdir(rid)
    assert run.data().decode().splitlines() == [str(uid), home, home, rid]


def test_exec_id_reuse_is_a_conflict(grid: Grid) -> None:
    rid = grid.open()
    grid.run(rid, "true", exec_id="same")
    again = grid.start(rid, "true", exec_id="same")
    assert isinstance(again, Error)
    assert again.code == "conflict"


def test_bad_requests_are_refused(grid: Grid) -> None:
    rid = grid.open()
    reply = grid.start(rid, "true", env={"BAD NAME": "x"})
    assert isinstance(reply, Error)
    assert reply.code == "invalid"
    reply = grid.alice.request(ExecSignal(grant=grid.grant(rid), exec_id="nope", signal="INT"))
    assert isinstance(reply, Error)
    assert reply.code == "not_found"
    run = grid.run(rid, "echo $GREETING", env={"GREETING": "hello there"})
    assert run.data() == b"hello there\n"
    assert run.exit is not None
    exec_id = run.exit.exec_id
    late = grid.alice.request(ExecSignal(grant=grid.grant(rid), exec_id=exec_id, signal="INT"))
    assert isinstance(late, Ok)
    assert late.detail == {"exec_id": exec_id, "state": "exited"}


def test_refused_grants_run_nothing(grid: Grid) -> None:
    rid = grid.open()
    closed = grid.open()
    assert isinstance(grid.close_reservation(closed), Ok)
    marker = grid.workdir(rid) / "marker"  # where `touch marker` would land, both executors
    cases: dict[str, tuple[str, Client]] = {
        "bad_signature": (grid.grant(rid, key=Ed25519PrivateKey.generate()), grid.alice),
        "expired": (grid.grant(rid, exp=time.time() - 120), grid.alice),
        "wrong_client": (grid.grant(rid), grid.mallory),
        "wrong_worker": (grid.grant(rid, worker="w2"), grid.alice),
        "reservation_not_open": (grid.grant(closed), grid.alice),
        "malformed": ("x" * 40, grid.alice),
    }
    for reason, (grant, sender) in cases.items():
        reply = grid.start(rid, "touch marker", grant=grant, client=sender)
        assert isinstance(reply, Error), (reason, reply)
        assert (reply.code, reply.detail) == ("forbidden", {"reason": reason}), reason
        requests: list[Body] = [ExecList(grant=grant),
                                ExecSignal(grant=grant, exec_id="x", signal="KILL"),
                                ExecLogs(grant=grant, exec_id="x")]
        for body in requests:
            other = sender.request(body)
            assert isinstance(other, Error), (reason, body)
            assert other.code == "forbidden", (reason, body)
    # mallory holds a valid grant of her own, but not for alice's reservation
    mallorys = grid.grant(rid, client="mallory")
    reply = grid.start(rid, "touch marker", grant=mallorys, client=grid.mallory)
    assert isinstance(reply, Error)
    assert reply.detail == {"reason": "wrong_client"}
    # only the coordinator opens and closes reservations
    evil: list[Body] = [ReservationOpen(reservation={"id": "r-evil", "worker": WID, "client":
                                                     "mallory", "expires_at": time.time() + 60}),
                        ReservationClose(reservation=rid)]
    for body in evil:
        reply = grid.mallory.request(body)
        assert isinstance(reply, Error)
        assert reply.code == "forbidden"
    assert not marker.exists()
    assert grid.run(rid, "echo still open").data() == b"still open\n"


def test_no_key_yet_then_pinned(grid_factory: Callable[..., Grid]) -> None:
    g = grid_factory(publish_key=False)
    assert g.service is not None
    rid = g.open()
    reply = g.start(rid, "true")
    assert isinstance(reply, Error)
    assert reply.detail == {"reason": "no_key"}
    g.publish_key(g.key)
    assert g.service.key_ready.wait(10)
    assert g.run(rid, "echo ok").data() == b"ok\n"
    pin = g.state_dir / "coord_pubkey"
    assert pin.read_text().strip() == public_key_to_text(g.key.public_key())
    assert pin.stat().st_mode & 0o777 == 0o600
    # a different key later is refused: grants of the old key keep working
    other = Ed25519PrivateKey.generate()
    g.publish_key(other)
    g.coord.publish(TOPICS.coord_pubkey, CoordPubkey(alg="ed25519", key=public_key_to_text(
        other.public_key())), qos=1).wait_for_publish(5)
    reply = g.start(rid, "true", grant=g.grant(rid, key=other))
    assert isinstance(reply, Error)
    assert reply.detail == {"reason": "bad_signature"}
    assert g.run(rid, "echo still").data() == b"still\n"
    g.publish_key(g.key)  # leave the broker as we found it


def test_configured_key_is_used(grid_factory: Callable[..., Grid]) -> None:
    key = Ed25519PrivateKey.generate()
    config = WorkerConfig(coord_pubkey=public_key_to_text(key.public_key()))
    g = grid_factory(worker_config=config, publish_key=False)
    assert g.service is not None
    assert g.service.key_ready.is_set()
    rid = g.open()
    assert g.run(rid, "echo ok", grant=g.grant(rid, key=key)).data() == b"ok\n"
    reply = g.start(rid, "true")  # signed by the grid's (unconfigured) key
    assert isinstance(reply, Error)
    assert reply.detail == {"reason": "bad_signature"}


@docker_on_mosquitto
def test_reservation_close_stops_commands_and_cleans(grid: Grid) -> None:
    rid = grid.open()
    fg = grid.start(rid, "echo ready; sleep 30")
    bg = grid.start(rid, "sleep 30", mode="background")
    assert isinstance(fg, ExecStarted)
    assert isinstance(bg, ExecStarted)
    run = grid.alice.run_of(fg.exec_id)
    wait_for(lambda: run.data() == b"ready\n", message="command did not start")
    assert grid.service is not None
    running, free = grid.service.running()
    assert {"kind": "reservation", "id": rid} in running
    assert {"kind": "exec", "id": fg.exec_id} in running
    assert free == 1
    workdir = grid.workdir(rid)
    assert workdir.is_dir()
    assert isinstance(grid.close_reservation(rid), Ok)
    wait_for(run.complete, message="no exec.exit after close")
    assert run.exit is not None
    assert run.exit.signal == signal.SIGTERM
    assert run.exit.error
    assert "reservation closed" in run.exit.error
    assert not workdir.exists()
    assert not workdir.parent.exists()
    assert grid.service.running() == ([], 2)
    wait_for(lambda: len(grid.reports) >= 2, message="both commands were not reported")
    reply = grid.start(rid, "true")
    assert isinstance(reply, Error)
    assert reply.detail == {"reason": "reservation_not_open"}
    # reopening an ended reservation is refused; closing again is harmless
    again = grid.coord.request(TOPICS.worker_inbox(WID), ReservationOpen(
        reservation={"id": rid, "worker": WID, "client": "alice", "expires_at": 1.0}),
        raise_errors=False)
    assert isinstance(again.body, Error)
    assert again.body.code == "conflict"
    assert isinstance(grid.close_reservation(rid), Ok)


def test_reservation_open_is_idempotent_and_checked(grid: Grid) -> None:
    rid = grid.open()
    assert grid.open(rid) == rid
    reply = grid.coord.request(TOPICS.worker_inbox(WID), ReservationOpen(
        reservation={"id": rid, "worker": WID, "client": "mallory", "expires_at": 1.0}),
        raise_errors=False)
    assert isinstance(reply.body, Error)
    assert reply.body.code == "conflict"
    reply = grid.coord.request(TOPICS.worker_inbox(WID), ReservationOpen(
        reservation={"id": "r-other", "worker": "w2", "client": "alice", "expires_at": 1.0}),
        raise_errors=False)
    assert isinstance(reply.body, Error)
    assert reply.body.code == "invalid"
    assert grid.workdir(rid).is_dir()
    assert (grid.workdir(rid).stat().st_mode & 0o777) == 0o700


def test_restarted_worker_recovers_its_session(grid: Grid) -> None:
    rid = grid.open()
    grid.run(rid, "echo kept > f.txt; mkdir sub; cd sub")
    started = grid.start(rid, "sleep 60", mode="background")
    assert isinstance(started, ExecStarted)
    old_service, old_bus = grid.service, grid.worker_bus
    assert old_service is not None
    assert old_bus is not None
    container = grid.container_of(rid)  # docker only
    old_bus.stop()  # the worker "crashes": its command keeps running, unsupervised
    (grid.state_dir / "sessions" / "junk").mkdir()
    grid.start_worker()
    assert grid.service is not None
    assert grid.service.key_ready.wait(10)
    # the orphan was killed, the junk dir removed, the session is back

    def orphan_gone() -> bool:
        try:
            return psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(orphan_gone, message="the orphaned command survived the restart")
    assert not (grid.state_dir / "sessions" / "junk").exists()
    assert grid.service.running()[0] == [{"kind": "reservation", "id": rid}]
    run = grid.run(rid, "cat ../f.txt; pwd")
    assert run.data().decode() == f"kept\n{grid.seen_workdir(rid)}/sub\n"
    # docker: the very container of the session came back (not a new one)
    assert grid.container_of(rid) == container
    grid.abort_streams(old_service)


def _previous_layout(handle: dict[str, Any]) -> dict[str, Any]:
    """A session handle as the worker wrote it before driver states existed."""
    state = handle["driver_state"]["data"]
    return {"session_id": handle["session_id"], "executor": handle["executor"],
            "workdir": handle["workdir"], "container_id": state.get("container_id"),
            "extra": {k: v for k, v in state.items() if k != "container_id"}}


def _unknown_version(handle: dict[str, Any]) -> dict[str, Any]:
    """A session handle written by a newer worker."""
    return {**handle, "driver_state": {"version": 99, "data": {"new": "layout"}}}


def test_restarted_worker_cleans_up_handles_it_cannot_read(
        grid: Grid, request: pytest.FixtureRequest) -> None:
    rids = [grid.open(), grid.open()]
    started = [grid.start(rid, "sleep 60", mode="background") for rid in rids]
    assert all(isinstance(s, ExecStarted) for s in started), started
    old_service, old_bus = grid.service, grid.worker_bus
    assert old_service is not None
    assert old_bus is not None
    old_bus.stop()  # the worker "crashes"; an upgrade or a downgrade restarts it
    for rid, rewrite in zip(rids, (_previous_layout, _unknown_version), strict=True):
        path = grid.workdir(rid).parent / "session.json"
        record = json.loads(path.read_text())
        record["handle"] = rewrite(record["handle"])
        path.write_text(json.dumps(record))
        assert SessionHandle.from_dict(record["handle"]).driver_state.version in (0, 99)
    grid.start_worker()  # must not crash: the sessions are cleaned up instead
    assert grid.service is not None
    assert grid.service.key_ready.wait(10)
    assert grid.service.running()[0] == []
    for rid, run in zip(rids, started, strict=True):
        assert not grid.workdir(rid).parent.exists()

        def gone(pid: int | None = run.pid) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, message=f"the command of {rid} survived the restart")
        reply = grid.start(rid, "true")
        assert isinstance(reply, Error)
        assert reply.detail == {"reason": "reservation_not_open"}
    if grid.docker:
        engine = request.getfixturevalue("docker_engine")
        assert not docker_containers(engine, grid.docker_wid), "containers not removed"
    assert grid.run(grid.open(), "echo fine").data() == b"fine\n"  # the worker works
    grid.abort_streams(old_service)


@pytest.mark.slow
def test_100_mb_arrive_complete_and_in_order(grid: Grid, request: pytest.FixtureRequest
                                             ) -> None:
    rid = grid.open()
    size = 100_000_000
    data = os.urandom(size)
    (grid.workdir(rid) / "big.bin").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    del data
    t0 = time.monotonic()
    run = grid.run(rid, "cat big.bin", timeout=60)
    elapsed = time.monotonic() - t0
    assert run.exit is not None
    assert run.exit.exit_code == 0
    assert run.exit.output_bytes == size
    assert not run.exit.truncated
    digest = hashlib.sha256()
    for seq in range(run.exit.last_seq + 1):
        digest.update(base64.b64decode(run.outputs[seq].data))
    assert digest.hexdigest() == expected
    assert run.order == sorted(run.order), "chunks arrived out of order"
    rate = size / elapsed / 1e6
    logging.getLogger(__name__).warning("100 MB through %s: %.1f s, %.1f MB/s (%d chunks)",
                                        request.node.callspec.id, elapsed, rate,
                                        run.exit.last_seq + 1)
    print(f"\n100 MB through {request.node.callspec.id}: {elapsed:.2f} s = {rate:.1f} MB/s")


# ------------------------------------------------------------- the streamer on its own


class FakeSend:
    """Records what the streamer publishes; ``gate`` holds publishing back."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Body]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inbox: str, body: Body) -> None:
        self.gate.wait(10)
        self.sent.append((inbox, body))

    def outputs(self) -> list[ExecOutput]:
        return [b for _, b in self.sent if isinstance(b, ExecOutput)]


def _finish(streamer: OutputStreamer) -> None:
    streamer.close_input()
    assert streamer.wait_cut(5)
    streamer.finish(ExecExit(exec_id="e", last_seq=streamer.last_seq, duration_s=0.0))
    assert streamer.join(5)


def test_streamer_numbers_coalesces_and_caps() -> None:
    send = FakeSend()
    streamer = OutputStreamer("e", send, max_bytes=10_000, ring_bytes=1000, chunk_bytes=4096,
                              linger_s=5.0)
    streamer.add_target("inbox")
    streamer.start()
    for _ in range(100):
        streamer.feed("stdout", b"a" * 10)
    streamer.feed("stderr", b"E")
    streamer.feed("stdout", b"b" * 20_000)
    _finish(streamer)
    outputs = send.outputs()
    assert [o.seq for o in outputs] == list(range(len(outputs)))
    assert outputs[0].stream == "stdout"
    assert base64.b64decode(outputs[0].data) == b"a" * 1000
    assert outputs[1].stream == "stderr"
    assert sum(len(base64.b64decode(o.data)) for o in outputs) == 10_000
    assert streamer.truncated
    assert streamer.output_bytes == 10_000
    assert all(len(base64.b64decode(o.data)) <= 4096 for o in outputs)
    assert isinstance(send.sent[-1][1], ExecExit)


def test_streamer_ring_keeps_the_newest_output() -> None:
    send = FakeSend()
    streamer = OutputStreamer("e", send, max_bytes=10**9, ring_bytes=300, chunk_bytes=100,
                              linger_s=0.0)
    streamer.start()
    for i in range(10):
        streamer.feed("stdout", bytes([65 + i]) * 100)
    _finish(streamer)
    views: list[Any] = []
    streamer.logs(0, 10**6, None, views.append)
    [view] = views
    assert [c.seq for c in view.chunks] == [7, 8, 9]
    assert view.first_seq == 7
    assert view.exit is not None
    assert view.following is False
    assert not send.sent  # background: nothing streamed


def test_streamer_backpressure_bounds_memory() -> None:
    send = FakeSend()
    send.gate.clear()
    streamer = OutputStreamer("e", send, max_bytes=10**9, ring_bytes=0, chunk_bytes=1000,
                              linger_s=0.0, max_pending=4000)
    streamer.add_target("inbox")
    streamer.start()
    fed = threading.Event()

    def producer() -> None:
        for _ in range(100):
            streamer.feed("stdout", b"x" * 1000)
        fed.set()

    thread = threading.Thread(target=producer)
    thread.start()
    # the streamer thread is stuck publishing: the producer fills max_pending and waits
    wait_for(lambda: streamer.pending_bytes >= 4000, message="nothing buffered")
    assert not fed.is_set()
    assert streamer.pending_bytes <= 5000
    send.gate.set()
    assert fed.wait(10)
    thread.join()
    _finish(streamer)
    assert sum(len(base64.b64decode(o.data)) for o in send.outputs()) == 100_000


def test_streamer_logs_budget_and_follow() -> None:
    send = FakeSend()
    streamer = OutputStreamer("e", send, max_bytes=10**9, ring_bytes=10**6, chunk_bytes=100,
                              linger_s=0.0)
    streamer.start()
    for i in range(5):
        streamer.feed("stdout", bytes([65 + i]) * 100)
    wait_for(lambda: streamer.last_seq == 4, message="chunks not cut")
    views: list[Any] = []
    streamer.logs(1, 250, "follower", views.append)  # room for two chunks of 100
    [view] = views
    assert [c.seq for c in view.chunks] == [1, 2]
    assert view.first_seq == 1
    assert view.following is True
    assert view.exit is None
    streamer.feed("stderr", b"late")
    _finish(streamer)
    streamed = [(inbox, b.seq) for inbox, b in send.sent if isinstance(b, ExecOutput)]
    assert streamed == [("follower", 3), ("follower", 4), ("follower", 5)]
    final = send.sent[-1][1]
    assert isinstance(final, ExecExit)
    assert final.last_seq == 5
    assert final.output_bytes == 504
    assert streamer.exit == final
    views.clear()
    streamer.logs(0, 10**6, "follower", views.append)  # after the exit: no following
    assert views[0].following is False
    assert views[0].exit == final


def test_commands_start_no_output_thread_of_their_own(grid: Grid,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command's output streamer runs on a reused thread (Thread.start() costs a
    scheduler round trip on a loaded machine, on the path of every command)."""
    rid = grid.open()
    assert grid.run(rid, "echo warm").data() == b"warm\n"
    started = record_thread_starts(monkeypatch)
    for number in range(10):
        assert grid.run(rid, f"echo {number}").data() == f"{number}\n".encode()
    assert [name for name in started if name.endswith("-out")] == []
