"""The coordinator's data store through the real CLI: ``xcloud data put`` / ``data get``.

``bench.file_copy`` calls ``measure_data`` on each grid it starts (the real coordinator,
its SQLite store and its data directory; Mosquitto or the embedded broker). Each command
runs as its own client process, as a user would run it, so

- MB/s = 10^6 bytes / wall time of the command: interpreter start, connect, SHA-256 of
  the file (put), the transfer, the coordinator's verification and hand-over, and the
  client's verification (get). The startup cost alone (``xcloud data ls``) is recorded
  beside it;
- the client's peak RSS is exact: ``ru_maxrss`` of that process from ``wait4``;
- the coordinator's peak RSS over the command comes from ``PeakRss`` (below).

``PeakRss`` is also what ``bench.file_copy`` uses for ``put`` / ``get`` to a reserved
worker: a bench that reads a process's lifetime peak would show its start-up, not the
transfer.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.processes import PY, REPO, child_env

MB = 1_000_000
KIB = 1024
SAMPLE_S = 0.02


def _status_kib(pid: int, key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a live process in KiB (0 if it is gone)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS (MiB) of some processes over a ``with`` block.

    The kernel's mark (``VmHWM``) is reset on entry and read on exit, so it catches a
    spike between samples; ``VmRSS`` is also sampled every 20 ms, which is all there
    is where the reset is refused.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.mib: dict[str, float] = {}
        self._seen = dict.fromkeys(self.pids, 0)
        self._reset: dict[str, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for name, pid in self.pids.items():
                self._seen[name] = max(self._seen[name], _status_kib(pid, "VmRSS"))

    def __enter__(self) -> PeakRss:
        self._reset = {name: _reset_hwm(pid) for name, pid in self.pids.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for name, pid in self.pids.items():
            hwm = _status_kib(pid, "VmHWM") if self._reset[name] else 0
            self.mib[name] = max(hwm, self._seen[name]) / KIB


def role_pids(xgrid: Any) -> dict[str, int]:
    """The coordinator's and the worker's pids in a ``bench.xcloud_grids`` grid (``xcloud
    up`` runs the coordinator in its own process; its broker and worker are children)."""
    procs = xgrid.procs
    coord = procs["up"].pid if "up" in procs else procs["coordinator"].pid
    worker = getattr(xgrid, "worker_pid", None) or (procs["worker"].pid
                                                     if "worker" in procs else 0)
    return {"coordinator": int(coord), "worker": int(worker or 0)}


def client_env(config: Any) -> dict[str, str]:
    """The environment of an ``xcloud`` command acting as the grid's bench client."""
    bus = config.bus
    return child_env(XCLOUD_HOME=str(config.home), XCLOUD_BUS_URL=bus.url,
                     XCLOUD_BUS_PRINCIPAL=bus.principal, XCLOUD_BUS_TOKEN=bus.token,
                     XCLOUD_BUS_ROOT=bus.root)


def run_client(args: list[str], env: dict[str, str], timeout: float = 900.0
               ) -> tuple[float, float]:
    """Run ``xcloud ARGS``; return (wall seconds, peak RSS MiB of that process)."""
    with tempfile.TemporaryFile() as log:  # a pipe could fill while we wait4
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "client.cli", *args], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            text = log.read().decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"xcloud {' '.join(args[:2])} exited {proc.returncode}: {text}")
    return wall, usage.ru_maxrss / KIB


def warmup_file(work: Path, size: int = 8 << 20) -> Path:
    """Random bytes for an untimed first call, other than any measured file's: the
    data store is content-addressed, so a measured file put before would not be sent."""
    path = work / f"warmup-{os.urandom(4).hex()}.bin"
    path.write_bytes(os.urandom(size))
    return path


def measure_data(xgrid: Any, work: Path, files: list[tuple[Path, str]]) -> dict[str, Any]:
    """``xcloud data put`` then ``data get`` of each file (smallest first), timed, with
    the coordinator's and the client's peak RSS; the bytes are checked by SHA-256."""
    import hashlib

    env = client_env(xgrid.config)
    coord = {"coordinator": role_pids(xgrid)["coordinator"]}
    startup, _ = run_client(["data", "ls"], env)
    out: dict[str, Any] = {"startup_s": startup, "sizes": {}}
    warm = work / "data-warmup.bin"  # untimed: the coordinator's first data call warms up
    run_client(["data", "put", str(warmup_file(work)), "--name", "bench-warmup"], env)
    run_client(["data", "get", "bench-warmup", "-o", str(warm)], env)
    warm.unlink()
    with contextlib.suppress(RuntimeError):
        run_client(["data", "rm", "bench-warmup"], env)
    for src, sha256 in files:
        size = src.stat().st_size
        name = f"bench-{size}"
        with PeakRss(coord) as up_rss:
            up_s, up_client = run_client(["data", "put", str(src), "--name", name], env)
        back = work / f"data-back-{size}.bin"
        with PeakRss(coord) as down_rss:
            down_s, down_client = run_client(["data", "get", name, "-o", str(back)], env)
        digest = hashlib.sha256()
        with open(back, "rb") as fh:
            while block := fh.read(4 << 20):
                digest.update(block)
        back.unlink()
        if digest.hexdigest() != sha256:
            raise RuntimeError("data get returned other bytes than were put")
        with contextlib.suppress(RuntimeError):
            run_client(["data", "rm", name], env)
        out["sizes"][str(size)] = {
            "up_mb_s": size / MB / up_s, "down_mb_s": size / MB / down_s,
            "up_s": up_s, "down_s": down_s,
            "rss_up": {"coordinator": up_rss.mib["coordinator"], "client": up_client},
            "rss_down": {"coordinator": down_rss.mib["coordinator"], "client": down_client},
        }
    return out
