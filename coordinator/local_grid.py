"""``xcloud up``: a whole grid on one machine with one command.

Starts the embedded broker (in a process of its own by default, ``broker.own_process``:
coordinator/broker_process.py; else a thread of this one), the coordinator in this
process, N workers as child processes, provisions their principals, writes the client
config so the shell and CLI just work here, and tears everything down in order on
Ctrl-C or SIGTERM: workers first (they publish a clean offline), then the coordinator,
then the broker.

One grid per home: before anything else ``run_up`` locks ``$XCLOUD_HOME/up.lock``
(coordinator/home_lock.py); a second ``xcloud up`` there says which grid holds it and
exits. A restart keeps the client's credentials: the admin token of config.toml is
reused while it still authenticates against the grid's database, and only the ``[bus]``
keys that changed are written, every other key and section kept.

Stopping removes every container the grid's docker workers made: a worker closes its
sessions when it stops cleanly, and ``stop`` then sweeps by label what a killed one left.

Workers and the broker die with ``xcloud up`` even when it is killed: each is started with
``--parent-pid`` and asks the kernel itself (PR_SET_PDEATHSIG, broker/parent_death.py) for a
SIGTERM when its parent goes. Nothing runs in the child between fork and exec
(``preexec_fn`` is unsafe while threads run, and the broker's and the bus's do).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.acl import Role
from broker.config import Config, mask_url, write_config
from broker.embedded import EmbeddedBroker, check_port_free
from broker.errors import BrokerError
from broker.main import broker_settings
from coordinator.auth import store_authenticator
from coordinator.bootstrap import issue_token
from coordinator.broker_process import BrokerProcess
from coordinator.home_lock import HomeLock
from coordinator.service import Coordinator
from coordinator.store import Store
from schemas.topics import valid_principal_id

log = logging.getLogger(__name__)

COORDINATOR_PRINCIPAL = "coordinator"
ADMIN_PRINCIPAL = "admin"


def local_worker_id(index: int) -> str:
    host = socket.gethostname().split(".")[0].lower() or "local"
    wid = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in host)
    wid = f"{wid}-w{index}"
    return wid if valid_principal_id(wid) else f"local-w{index}"


@dataclass
class WorkerProcess:
    wid: str
    state_dir: Path
    log_file: Path
    token: str = field(default="", repr=False)
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)


class LocalGrid:
    """Everything ``xcloud up`` runs, with explicit start and stop."""

    def __init__(self, config: Config, workers: int, executor: str) -> None:
        self.config = config
        self.n_workers = workers
        self.executor = executor
        self.store: Store | None = None
        self.broker: EmbeddedBroker | None = None  # broker.own_process false
        self.broker_process: BrokerProcess | None = None  # broker.own_process true
        self.coordinator: Coordinator | None = None
        self.workers: list[WorkerProcess] = []
        self._stop = threading.Event()
        self._broker_restarts: list[float] = []
        self.home_lock: HomeLock | None = None  # run_up takes it before anything else

    @property
    def broker_url(self) -> str:
        return f"mqtt://{self.config.broker.host}:{self.broker_port}"

    @property
    def broker_port(self) -> int:
        if self.broker_process is not None:
            return self.broker_process.port
        return self.broker.port if self.broker else 0

    @property
    def broker_ws_port(self) -> int:
        if self.broker_process is not None:
            return self.broker_process.ws_port
        return (self.broker.ws_port or 0) if self.broker else 0

    def start(self) -> None:
        cfg = self.config
        check_port_free(cfg.broker.host, cfg.broker.port)
        if cfg.broker.ws_port:
            check_port_free(cfg.broker.host, cfg.broker.ws_port)
        cfg.home.mkdir(parents=True, exist_ok=True)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(cfg.db_url)
        coord_token = issue_token(self.store, COORDINATOR_PRINCIPAL, "coordinator",
                                  "xcloud up", replace=True)
        admin_token = self._admin_token()
        if cfg.broker.own_process:
            self.broker_process = BrokerProcess(cfg, cfg.home / "logs" / "broker.log")
            self.broker_process.start()
        else:
            self.broker = EmbeddedBroker(broker_settings(cfg), store_authenticator(self.store))
            self.broker.start_in_thread()
        cfg.bus.url = self.broker_url
        if self.home_lock is not None:
            self.home_lock.describe(broker=self.broker_url)
        update_client_config(cfg.config_file, {
            "url": self.broker_url, "principal": ADMIN_PRINCIPAL, "token": admin_token,
            "root": cfg.bus.root,
        })
        cfg.bus.principal, cfg.bus.token = COORDINATOR_PRINCIPAL, coord_token
        self.coordinator = Coordinator(cfg, self.store)
        self.coordinator.start()
        for index in range(1, self.n_workers + 1):
            self._spawn(self._provision_worker(index))

    def _admin_token(self) -> str:
        """The admin token of config.toml while it still authenticates against this
        grid's database (so open shells reconnect after a restart); else a new one."""
        assert self.store is not None
        current = _file_bus_section(self.config.config_file)
        token = current.get("token")
        if current.get("principal") == ADMIN_PRINCIPAL and isinstance(token, str) and token:
            principal = store_authenticator(self.store)(ADMIN_PRINCIPAL, token)
            if principal is not None and principal.role == Role.ADMIN:
                log.info("keeping the admin token of %s", self.config.config_file)
                return token
        return issue_token(self.store, ADMIN_PRINCIPAL, "admin", "xcloud up", replace=True)

    def _provision_worker(self, index: int) -> WorkerProcess:
        assert self.store is not None
        wid = local_worker_id(index)
        state_dir = self.config.home / "workers" / wid
        state_dir.mkdir(parents=True, exist_ok=True)
        token = issue_token(self.store, wid, "worker", "xcloud up", replace=True)
        from worker.identity import save_identity  # lean import path for the worker

        save_identity(state_dir, wid, token)
        wp = WorkerProcess(wid, state_dir, self.config.home / "logs" / f"{wid}.log",
                           token=token)
        self.workers.append(wp)
        return wp

    def worker_command(self, wp: WorkerProcess) -> list[str]:
        """``xcloud worker`` for ``wp``; it stops by itself when this process dies.

        The kernel's parent-death signal follows the *thread* that forked: workers are
        spawned from the main thread only (``start`` and ``supervise``), which lives as
        long as the process.
        """
        cmd = [
            sys.executable, "-m", "client.cli", "worker",
            "--broker", self.broker_url, "--root", self.config.bus.root,
            "--state-dir", str(wp.state_dir), "--name", wp.wid,
            "--executor", self.executor, "--slots", str(self.config.worker.slots),
            "--heartbeat", str(self.config.worker.heartbeat_s),
            "--parent-pid", str(os.getpid()),
        ]
        if self.config.worker.tags:
            cmd += ["--tags", ",".join(self.config.worker.tags)]
        return cmd

    def _spawn(self, wp: WorkerProcess) -> None:
        wp.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.worker_command(wp)
        # The identity goes in the environment: it beats the client credentials in
        # config.toml, and unlike flags it does not show in `ps`.
        env = dict(os.environ, XCLOUD_HOME=str(self.config.home),
                   XCLOUD_BUS_PRINCIPAL=wp.wid, XCLOUD_BUS_TOKEN=wp.token)
        with open(wp.log_file, "ab") as logf:
            wp.process = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)
        log.info("worker %s started (pid %d, log %s)", wp.wid, wp.process.pid, wp.log_file)

    def summary(self) -> str:
        cfg = self.config
        dashboard = self.coordinator.dashboard if self.coordinator else None
        lines = [
            "xcloud is up",
            f"  broker       {self.broker_url}"
            + (f"  (websocket ws://{cfg.broker.host}:{self.broker_ws_port})"
               if self.broker_ws_port else "")
            + (f"  (own process, log {self.broker_process.log_file})"
               if self.broker_process else ""),
            f"  coordinator  principal {COORDINATOR_PRINCIPAL}, "
            f"database {mask_url(cfg.db_url)}",
            f"  workers      {len(self.workers)} x {self.executor}: "
            + ", ".join(w.wid for w in self.workers),
            f"  client       {cfg.config_file} (principal {ADMIN_PRINCIPAL})",
            *([f"  dashboard    {dashboard.url}  (log in as {ADMIN_PRINCIPAL}, token in "
               f"{cfg.config_file})"] if dashboard is not None else []),
            f"  logs         {cfg.home / 'logs'}",
            "",
            "In another terminal:  xcloud workers",
            "Stop with Ctrl-C.",
        ]
        return "\n".join(lines)

    def supervise(self) -> None:
        """Block until asked to stop, restarting the broker process and workers that
        die (each at most 3 times a minute)."""
        while not self._stop.wait(0.5):
            now = time.time()
            self._keep_broker(now)
            for wp in self.workers:
                if wp.process is None or wp.process.poll() is None:
                    continue
                wp.restarts = [t for t in wp.restarts if now - t < 60]
                if len(wp.restarts) >= 3:
                    continue
                log.warning("worker %s exited with %s; restarting", wp.wid,
                            wp.process.returncode)
                wp.restarts.append(now)
                self._spawn(wp)

    def _keep_broker(self, now: float) -> None:
        """A broker process that died is started again on the same port: the coordinator
        and the workers reconnect to it as they would after any broker restart."""
        bp = self.broker_process
        if bp is None or bp.alive():
            return
        self._broker_restarts = [t for t in self._broker_restarts if now - t < 60]
        if len(self._broker_restarts) >= 3:
            return
        log.warning("the broker exited with %s; restarting",
                    bp.process.returncode if bp.process else None)
        self._broker_restarts.append(now)
        self.config.broker.port = bp.port
        try:
            bp.start()
        except BrokerError as err:
            log.error("cannot restart the broker: %s", err)

    def request_stop(self) -> None:
        self._stop.set()

    def sweep_containers(self) -> list[str]:
        """Remove the containers our docker workers left: a worker that stops cleanly
        removes its own, one that was killed cannot. Found by their state-dir label, so
        another grid's workers with the same ids are never touched."""
        if self.executor != "docker" or not self.workers:
            return []
        from worker.executors.base import ExecutorError
        from worker.executors.docker.container import LABEL_STATE_DIR, remove_labelled

        removed: list[str] = []
        for wp in self.workers:
            try:
                removed += remove_labelled({LABEL_STATE_DIR: str(wp.state_dir.resolve())})
            except ExecutorError as err:
                log.warning("cannot sweep the containers of worker %s: %s", wp.wid, err)
        if removed:
            log.warning("removed %d container(s) the workers left: %s", len(removed),
                        ", ".join(removed))
        return removed

    def stop(self) -> None:
        self._stop.set()
        for wp in self.workers:
            if wp.process and wp.process.poll() is None:
                wp.process.terminate()
        deadline = time.monotonic() + 10
        for wp in self.workers:
            if wp.process is None:
                continue
            try:
                wp.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                wp.process.kill()
                wp.process.wait()
        self.sweep_containers()
        if self.coordinator:
            self.coordinator.stop()
        if self.broker_process:
            self.broker_process.stop()
        if self.broker:
            try:
                self.broker.stop_in_thread()
            except BrokerError as err:
                # Everything it served has stopped; its daemon thread ends with the
                # process. Not a reason to fail the grid's stop (and skip the store).
                log.warning("%s; leaving it to end with the process", err)
        if self.store:
            self.store.close()


def _file_bus_section(path: Path) -> dict[str, Any]:
    """The ``[bus]`` table of the config file as written (no environment, no flags)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    bus = data.get("bus")
    return bus if isinstance(bus, dict) else {}


def update_client_config(path: Path, bus: dict[str, Any]) -> bool:
    """Set these ``[bus]`` keys in the config file, keeping every other key and section;
    leave the file untouched when they already hold these values. True if written."""
    current = _file_bus_section(path)
    if all(current.get(k) == v for k, v in bus.items()):
        return False
    write_config(path, {"bus": {**current, **bus}})
    return True


def run_up(config: Config, workers: int, executor: str) -> int:
    # First of all: one grid per home (coordinator/home_lock.py). A second `xcloud up`
    # stops here, having touched nothing of the grid that runs.
    with HomeLock.acquire(config.home) as home_lock:
        return _run_locked(config, workers, executor, home_lock)


def _run_locked(config: Config, workers: int, executor: str, home_lock: HomeLock) -> int:
    grid = LocalGrid(config, workers, executor)
    grid.home_lock = home_lock

    def on_signal(_signum: int, _frame: object) -> None:
        grid.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        grid.start()
        print(grid.summary(), flush=True)
        grid.supervise()
        print("stopping...", flush=True)
    finally:
        grid.stop()
    return 0
