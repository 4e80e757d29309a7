"""The embedded broker in a process of its own, for ``xcloud up`` (``broker.own_process``).

Why a process: in one process the broker's asyncio loop and the coordinator's threads
share one interpreter lock, and every message of a job or a command crosses both
(BENCHMARKS.md §6 measured the difference). The child is ``xcloud broker`` on the same
database (it only reads principals there; SQLite in WAL mode lets it read while the
coordinator writes), told everything through its environment (a MariaDB password never
shows in ``ps``), and ``--parent-pid`` makes it die with ``xcloud up`` even when that is
killed (broker/parent_death.py). It prints ``broker listening on URL`` once it listens:
the grid waits for that line in the child's log, so a port taken meanwhile or a broker
that cannot start is reported with the log's tail instead of a hang.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.config import Config
from broker.errors import BrokerError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02
LISTENING = re.compile(r"^broker listening on mqtt://(?P<host>[^\s]+):(?P<port>\d+)"
                       r"(?: and ws://[^\s]+:(?P<ws>\d+))?", re.MULTILINE)


class BrokerProcess:
    """``xcloud broker`` as a child of this process; ``port``/``ws_port`` once started."""

    def __init__(self, config: Config, log_file: Path) -> None:
        self.config = config
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ws_port = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "client.cli", "broker", "--parent-pid", str(os.getpid())]

    def environment(self) -> dict[str, str]:
        cfg = self.config
        return dict(
            os.environ, XCLOUD_HOME=str(cfg.home),
            XCLOUD_BROKER_HOST=cfg.broker.host, XCLOUD_BROKER_PORT=str(cfg.broker.port),
            XCLOUD_BROKER_WS_PORT=str(cfg.broker.ws_port or 0),
            XCLOUD_BROKER_ALLOW_ANONYMOUS="1" if cfg.broker.allow_anonymous else "0",
            XCLOUD_BUS_ROOT=cfg.bus.root, XCLOUD_COORDINATOR_DB=cfg.db_url)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the child (from the main thread: see broker/parent_death.py) and wait
        until it listens; BrokerError with its log's tail if it exits or stays silent."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as logf:
            self.process = subprocess.Popen(
                self.command(), stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.environment(), start_new_session=True)
        log.info("broker started (pid %d, log %s)", self.process.pid, self.log_file)
        deadline = time.monotonic() + timeout
        while True:
            found = LISTENING.search(self._log_since(offset))
            if found:
                self.port = int(found["port"])
                self.ws_port = int(found["ws"] or 0)
                return
            if self.process.poll() is not None:
                raise BrokerError(f"the broker exited with {self.process.returncode}:\n"
                                  + self._tail(offset))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the broker did not listen within {timeout:g}s:\n"
                                  + self._tail(offset))
            time.sleep(POLL_S)  # polling a log file: nothing to wait on

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the broker did not stop within %gs; killed", timeout)
            proc.kill()
            proc.wait()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read(1 << 16).decode("utf-8", "replace")
        except OSError:
            return ""

    def _tail(self, offset: int) -> str:
        return "\n".join(self._log_since(offset).splitlines()[-15:])
