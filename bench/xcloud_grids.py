"""xcloud grids as real, separate processes, for the benchmarks that go through ``Grid``.

``UpGrid``: ``xcloud up --workers 1`` (embedded amqtt broker and coordinator, one worker
child; process or docker executor). ``SplitGrid``: a broker (Mosquitto, or ``xcloud
broker``), ``xcloud coordinator`` and ``xcloud worker`` as three processes, principals
made with ``xcloud admin principal add``. Each gives a client config for
``Grid.connect``, the pids to meter, and its logs for a failure report.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

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
    tail,
    wait_until,
)
from bench.scratch import unique_root

IMAGE = "xcloud-busybox:latest"
LEASE_S = 300.0


class XcloudGrid:
    """A grid in separate processes; ``config`` is a client config for ``Grid``."""

    label = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config: Any = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.reservations: list[str] = []

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def start(self) -> XcloudGrid:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p}\n{tail(p)}" for p in self.logs)

    def remove_leftover_containers(self) -> None:
        """Backstop: the session containers of our reservations, should any survive."""
        if not self.reservations or shutil.which("docker") is None:
            return
        for rid in self.reservations:
            out = subprocess.run(["docker", "ps", "-aq", "--filter",
                                  f"label=xcloud.session={rid}"],
                                 capture_output=True, text=True, timeout=30, check=False)
            for cid in out.stdout.split():
                subprocess.run(["docker", "rm", "-f", cid], capture_output=True,
                               timeout=60, check=False)

    def __enter__(self) -> XcloudGrid:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UpGrid(XcloudGrid):
    """``xcloud up --workers 1``: embedded amqtt broker + coordinator, one worker child."""

    def __init__(self, workdir: Path, executor: str = "process", image: str = IMAGE,
                 broker_thread: bool = False) -> None:
        super().__init__(workdir)
        self.executor = executor
        self.image = image
        self.broker_thread = broker_thread  # broker.own_process = false
        self.label = ("amqtt (xcloud up" + (", broker in a thread" if broker_thread else "")
                      + ")" + (", docker executor" if executor == "docker" else ""))
        self.home = workdir / f"up-{executor}-{uuid.uuid4().hex[:6]}"

    def start(self, timeout: float = 90.0) -> UpGrid:
        from broker.config import load_config

        extra = {"XCLOUD_HOME": str(self.home)}
        if self.broker_thread:
            extra["XCLOUD_BROKER_OWN_PROCESS"] = "false"
        if self.executor == "docker":
            extra["XCLOUD_WORKER_DOCKER_IMAGE"] = self.image
        log_file = self.home / "up.log"
        self.logs = [log_file]
        for attempt in range(3):
            port = free_port()
            proc = spawn([PY, "-m", "client.cli", "up", "--port", str(port), "--workers", "1",
                          "--executor", self.executor], child_env(**extra), log_file)
            self.procs = {"up": proc}
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                cfg_file = self.home / "config.toml"
                if cfg_file.exists() and port_open(LOCALHOST, port):
                    cfg = load_config(env={"XCLOUD_HOME": str(self.home)})
                    if cfg.bus.principal and cfg.bus.url.endswith(f":{port}"):
                        self.config = cfg
                        break
                time.sleep(0.05)
            if self.config is not None:
                break
            stop_process(proc)
            if attempt == 2:
                raise RuntimeError(f"xcloud up did not start:\n{self.diagnostics()}")
        workers_logs = self.home / "logs"

        def worker_child() -> int | None:
            with contextlib.suppress(psutil.Error):
                for kid in psutil.Process(self.procs["up"].pid).children():
                    if "worker" in kid.cmdline():  # not the broker's process
                        return int(kid.pid)
            return None

        wpid = wait_until(worker_child, 30, 0.05, "the worker process")
        self.worker_pid = wpid
        self.logs += sorted(workers_logs.glob("*.log"))
        return self

    def pids(self) -> dict[str, int]:
        return {"broker+coordinator": self.procs["up"].pid, "worker": self.worker_pid}

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, 40)
        self.remove_leftover_containers()


class SplitGrid(XcloudGrid):
    """Broker, ``xcloud coordinator`` and ``xcloud worker`` as three processes.

    ``mosquitto``: Mosquitto with the password and ACL files of ``broker.mosquitto``
    (``bench.brokers.MosquittoBroker``); ``amqtt``: ``xcloud broker`` (the embedded broker
    alone in its process, authenticating against the same database).
    """

    def __init__(self, workdir: Path, broker: str = "mosquitto") -> None:
        super().__init__(workdir)
        self.kind = broker
        self.label = "Mosquitto" if broker == "mosquitto" else "amqtt (`xcloud broker`)"
        self.dir = workdir / f"{broker}-{uuid.uuid4().hex[:6]}"
        self.broker: MosquittoBroker | None = None

    def _principal(self, pid: str, role: str, db: str) -> Identity:
        out = subprocess.run(
            [PY, "-m", "client.cli", "admin", "principal", "add", pid, "--role", role,
             "--db", db], cwd=REPO, env=child_env(XCLOUD_HOME=str(self.dir / "home")),
            capture_output=True, text=True, timeout=60, check=True)
        token = out.stdout.strip().splitlines()[-1].strip()
        return Identity(pid, role, token)

    def _start_amqtt(self, root: str, db: str, home: Path, timeout: float) -> str:
        log_file = self.dir / "broker.log"
        self.logs.append(log_file)
        for _attempt in range(3):
            port = free_port()
            proc = spawn([PY, "-m", "client.cli", "broker", "--port", str(port), "--root", root,
                          "--db", db], child_env(XCLOUD_HOME=str(home)), log_file)
            self.procs["amqtt"] = proc
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if port_open(LOCALHOST, port):
                    return f"mqtt://{LOCALHOST}:{port}"
                time.sleep(0.05)
            stop_process(proc)
        raise RuntimeError(f"xcloud broker did not start:\n{tail(log_file)}")

    def start(self, timeout: float = 60.0) -> SplitGrid:
        from broker.config import BusConfig, Config

        self.dir.mkdir(parents=True)
        home = self.dir / "home"
        db = f"sqlite:///{self.dir / 'xcloud.db'}"
        root = unique_root("exec")
        wid = "bench-w1"
        ids = {i.id: i for i in (self._principal("coordinator", "coordinator", db),
                                 self._principal("bench-client", "client", db),
                                 self._principal(wid, "worker", db))}
        if self.kind == "mosquitto":
            self.broker = MosquittoBroker(ids, root, self.dir).start()
            url = self.broker.url
        else:
            url = self._start_amqtt(root, db, home, timeout)
        coord, worker = ids["coordinator"], ids[wid]
        self.logs += [self.dir / "coordinator.log", self.dir / "worker.log"]
        self.procs["coordinator"] = spawn(
            [PY, "-m", "client.cli", "coordinator", "--broker", url, "--root", root,
             "--db", db],
            child_env(XCLOUD_HOME=str(home), XCLOUD_BUS_PRINCIPAL=coord.id,
                      XCLOUD_BUS_TOKEN=coord.token), self.logs[-2])
        self.procs["worker"] = spawn(
            [PY, "-m", "client.cli", "worker", "--broker", url, "--root", root,
             "--state-dir", str(self.dir / "worker"), "--name", wid, "--executor", "process"],
            child_env(XCLOUD_HOME=str(home), XCLOUD_BUS_PRINCIPAL=wid,
                      XCLOUD_BUS_TOKEN=worker.token), self.logs[-1])
        cfg = Config()
        cfg.home = home
        client = ids["bench-client"]
        cfg.bus = BusConfig(url=url, principal=client.id, token=client.token, root=root)
        self.config = cfg
        return self

    def pids(self) -> dict[str, int]:
        out = super().pids()
        if self.broker is not None:
            out["mosquitto"] = self.broker.pid
        return out

    def stop(self) -> None:
        for name in ("worker", "coordinator", "amqtt"):
            stop_process(self.procs.get(name), 40)
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def wait_online(grid: Any, timeout: float = 90.0) -> None:
    from broker.bus import BusError
    from client.errors import ClientError

    def online() -> bool:
        try:
            return bool(grid.workers(state=["online"]))
        except (BusError, ClientError):
            return False

    wait_until(online, timeout, 0.2, "an online worker")
