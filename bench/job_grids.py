"""The two xcloud grids of the batch-job benchmarks (``bench.jobs``, ``bench.job_replicas``),
2 workers x 2 slots each, and the client-side log of the ``job.event`` messages they send.

``SplitGrid2``: Mosquitto, ``xcloud coordinator`` and two ``xcloud worker --slots 2`` as
separate processes (principals made with ``xcloud admin principal add``). ``UpGrid2``:
``xcloud up --workers 2`` (embedded amqtt broker and coordinator). ``EventLog`` hooks a
``Grid``'s job store: when each (job, state) event reached this client.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.brokers import MosquittoBroker
from bench.identities import Identity
from bench.processes import (
    LOCALHOST,
    PY,
    REPO,
    child_env,
    free_port,
    port_open,
    spawn,
    stop_process,
    wait_until,
)
from bench.scratch import unique_root
from bench.xcloud_grids import XcloudGrid

SLOTS = 2
WORKERS = 2
TERMINAL = frozenset({"completed", "failed", "cancelled"})

# ----------------------------------------------------------------------------- xcloud grids


class SplitGrid2(XcloudGrid):
    """Mosquitto, ``xcloud coordinator`` and two ``xcloud worker --slots 2``."""

    label = "xcloud, Mosquitto"

    def __init__(self, workdir: Path, prefetch: int = 0, instant: bool = False) -> None:
        super().__init__(workdir)
        self.prefetch = prefetch  # [jobs] prefetch of its coordinator (docs/jobs.md)
        # workers that run nothing (bench/instant_workers.py): the coordinator's ceiling
        self.instant = instant
        if prefetch:
            self.label = f"xcloud, Mosquitto, prefetch {prefetch}"
        if instant:
            self.label = "xcloud, Mosquitto, workers that run nothing"
        self.dir = workdir / f"mosquitto-{uuid.uuid4().hex[:6]}"
        self.db_file = self.dir / "xcloud.db"
        self.broker: MosquittoBroker | None = None
        self.root = unique_root("jobs")

    def _principal(self, pid: str, role: str, db: str) -> Identity:
        out = subprocess.run(
            [PY, "-m", "client.cli", "admin", "principal", "add", pid, "--role", role,
             "--db", db], cwd=REPO, env=child_env(XCLOUD_HOME=str(self.dir / "home")),
            capture_output=True, text=True, timeout=60, check=True)
        return Identity(pid, role, out.stdout.strip().splitlines()[-1].strip())

    def start(self) -> SplitGrid2:
        from broker.config import BusConfig, Config

        self.dir.mkdir(parents=True)
        home = self.dir / "home"
        db = f"sqlite:///{self.db_file}"
        wids = [f"bench-w{i + 1}" for i in range(WORKERS)]
        people = [("coordinator", "coordinator"), ("bench-client", "client")]
        ids = {i.id: i for i in (self._principal(p, r, db)
                                 for p, r in people + [(w, "worker") for w in wids])}
        self.broker = MosquittoBroker(ids, self.root, self.dir).start()
        url = self.broker.url
        coord = ids["coordinator"]
        self.logs.append(self.dir / "coordinator.log")
        self.procs["coordinator"] = spawn(
            [PY, "-m", "client.cli", "coordinator", "--broker", url, "--root", self.root,
             "--db", db],
            child_env(XCLOUD_HOME=str(home), XCLOUD_BUS_PRINCIPAL=coord.id,
                      XCLOUD_BUS_TOKEN=coord.token,
                      XCLOUD_JOBS_PREFETCH=str(self.prefetch)), self.logs[-1])
        for wid in wids:
            self.logs.append(self.dir / f"{wid}.log")
            cmd = ([PY, "-m", "bench.instant_workers", "--broker", url, "--root", self.root,
                    "--name", wid, "--slots", str(SLOTS),
                    "--job-queue", str(max(2, self.prefetch))] if self.instant else
                   [PY, "-m", "client.cli", "worker", "--broker", url, "--root", self.root,
                    "--state-dir", str(self.dir / wid), "--name", wid, "--executor",
                    "process", "--slots", str(SLOTS)])
            self.procs[wid] = spawn(
                cmd,
                child_env(XCLOUD_HOME=str(home), XCLOUD_BUS_PRINCIPAL=wid,
                          XCLOUD_BUS_TOKEN=ids[wid].token,
                          XCLOUD_WORKER_JOB_QUEUE=str(max(2, self.prefetch))),
                self.logs[-1])
        cfg = Config()
        cfg.home = home
        client = ids["bench-client"]
        cfg.bus = BusConfig(url=url, principal=client.id, token=client.token, root=self.root)
        self.config = cfg
        return self

    def coordinator_pid(self) -> int:
        return self.procs["coordinator"].pid

    def stop_coordinator(self) -> None:
        """Stop the coordinator first: the workers stay "online" in its database."""
        stop_process(self.procs.get("coordinator"), 40)

    def stop(self) -> None:
        self.stop_coordinator()
        for name, proc in self.procs.items():
            if name != "coordinator":
                stop_process(proc, 40)
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


class UpGrid2(XcloudGrid):
    """``xcloud up --workers 2`` with ``XCLOUD_WORKER_SLOTS=2`` (embedded amqtt)."""

    label = "xcloud, embedded broker (`xcloud up`)"

    def __init__(self, workdir: Path, broker_thread: bool = False) -> None:
        super().__init__(workdir)
        self.home = workdir / f"up-{uuid.uuid4().hex[:6]}"
        self.broker_thread = broker_thread  # broker.own_process = false
        if broker_thread:
            self.label = "xcloud, embedded broker in a thread of `xcloud up`"

    def start(self, timeout: float = 90.0) -> UpGrid2:
        from broker.config import load_config

        env = child_env(XCLOUD_HOME=str(self.home), XCLOUD_WORKER_SLOTS=str(SLOTS),
                        **({"XCLOUD_BROKER_OWN_PROCESS": "false"} if self.broker_thread
                           else {}))
        log_file = self.home / "up.log"
        self.logs = [log_file]
        for attempt in range(3):
            port = free_port()
            proc = spawn([PY, "-m", "client.cli", "up", "--port", str(port), "--workers",
                          str(WORKERS), "--executor", "process", "--no-http"], env, log_file)
            self.procs = {"up": proc}
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if (self.home / "config.toml").exists() and port_open(LOCALHOST, port):
                    cfg = load_config(env={"XCLOUD_HOME": str(self.home)})
                    if cfg.bus.principal and cfg.bus.url.endswith(f":{port}"):
                        self.config = cfg
                        break
                time.sleep(0.05)
            if self.config is not None:
                return self
            stop_process(proc)
            if attempt == 2:
                break
        raise RuntimeError(f"xcloud up did not start:\n{self.diagnostics()}")

    def coordinator_pid(self) -> int:
        return self.procs["up"].pid

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, 40)


class EventLog:
    """``job.event`` and ``job.events`` arrivals here: (job, state) -> monotonic time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: dict[tuple[str, str], float] = {}
        self.ended: set[str] = set()

    def hook(self, grid: Any) -> None:
        store = grid.jobs
        original = store.on_events

        def on_events(events: list[Any]) -> None:
            now = time.monotonic()
            with self.cond:
                for event in events:
                    self.seen.setdefault((event.job, event.state), now)
                    if event.state in TERMINAL:
                        self.ended.add(event.job)
                self.cond.notify_all()
            original(events)

        store.on_events = on_events

    def wait(self, key: tuple[str, str], timeout: float) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.seen, timeout):
                raise TimeoutError(f"no job.event {key[1]} for {key[0]} in {timeout:g} s")
            return self.seen[key]


def wait_workers(grid: Any, count: int, timeout: float = 90.0) -> None:
    from broker.bus import BusError
    from client.errors import ClientError

    def online() -> bool:
        try:
            return len(grid.workers(state=["online"])) >= count
        except (BusError, ClientError):
            return False

    wait_until(online, timeout, 0.2, f"{count} online workers")
