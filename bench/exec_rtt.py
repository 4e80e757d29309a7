"""Exec round trip and output streaming: xcloud beside ``ssh`` (ControlMaster) and ``docker exec``.

One run measures, side by side, on this machine:

1. **Round trip of ``true``** on a held worker: ``Grid.reserve`` once, then
   ``ReservedWorker.run("true")`` N times (wall clock in the client, from the call to
   the returned result). The grid runs as real separate processes, as ``xcloud up``
   wires it:

   - ``amqtt``: ``python -m client.cli up --workers 1`` (embedded amqtt broker in a
     process of its own, the coordinator in up's, the worker a child process; process
     executor); ``amqtt-thread`` (opt in): the same with ``broker.own_process = false``
     (broker and coordinator share one process, as before);
   - ``mosquitto``: Mosquitto on its own (``set_tcp_nodelay true``, password and ACL
     files from ``broker.mosquitto``), ``python -m client.cli coordinator`` and
     ``python -m client.cli worker``, principals made with ``xcloud admin principal add``;
   - ``docker``: ``up --executor docker`` with the ``xcloud-busybox`` image (a
     hardened session container per reservation, a ``docker exec`` per command);
   - ``amqtt-own`` (only when asked for with ``--only``): ``python -m client.cli broker``
     (amqtt alone in its process) with the coordinator and worker as for Mosquitto;
     it shows what sharing one GIL with the coordinator costs ``xcloud up``.

   A second loop (100 calls) with ``ReservedWorker.stream("true")`` splits each round
   trip into "until ``exec.started`` came back" and "until ``exec.exit``"; CPU meters on
   every grid process give the CPU milliseconds each one spends per command.
2. **``ssh root@127.0.0.1 true``** through an OpenSSH ControlMaster (the twin of a held
   reservation: no new TCP connection, no key exchange, one new channel per command),
   against a private ``sshd`` on a free port (host and user keys made for the run).
   bash sources ``~/.bashrc`` for commands run over ssh; root's here runs ``pyenv
   init`` (~0.1-0.3 s), so this sshd runs in a private mount namespace where an empty
   file hides it. The same with root's own ``~/.bashrc`` is reported too (20 calls).
   CPU meters: sshd with its sessions, the master, and the ``ssh`` clients.
3. **``docker exec <running busybox container> true``**, with the CLI and with the
   docker SDK's low-level API (``exec_create`` + ``exec_start`` + ``exec_inspect``).
4. **Streaming**: ``cat`` of a file of random bytes (100 MB; 20 MB with ``--quick``):
   through xcloud (``ReservedWorker.stream``, bytes counted in the client), through
   ``ssh … cat`` over the ControlMaster and ``docker exec … cat`` (CLI and SDK; the file
   bind-mounted read-only), each read from a pipe and counted in this process. With
   the docker executor the file is made inside the session (``head -c N /dev/urandom``
   into ``/work``). A local ``cat`` and a local ``true`` give the floor.

Every variant gets warm-up calls first. Nothing is asserted: the targets (p50 ≤ 5 ms on
the embedded broker and at most half of ssh's p50, issue 13; ≥ 50 MB/s streamed) are
reported as met or missed.

    python -m bench.exec_rtt [--quick] [--runs N] [--mb M] [--only amqtt,mosquitto,...]

The results JSON goes to ``bench/results/exec_rtt-<time>.json`` unless ``--json`` says
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    LOCALHOST,
    RESULTS_DIR,
    Identity,
    MosquittoBroker,
    cli,
    die_with_parent,
    fmt,
    free_port,
    latency_ms,
    machine_line,
    md_table,
    percentile,
    port_open,
    ratio,
    scratch_dir,
    unique_root,
    wait_for_quiet,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
IMAGE = "xcloud-busybox:latest"
VARIANTS = ("amqtt", "mosquitto", "docker", "ssh", "docker-exec", "local", "amqtt-own",
            "amqtt-thread")
# Opt in: amqtt-own (`xcloud broker` beside `xcloud coordinator`) and amqtt-thread
# (`xcloud up` with broker.own_process = false: broker and coordinator in one process).
DEFAULT_VARIANTS = VARIANTS[:-2]
WARMUP = 10
FULL = {"runs": 300, "mb": 100, "reps": 3}
QUICK = {"runs": 50, "mb": 20, "reps": 2}
MB = 1_000_000
LEASE_S = 300.0
SSH_OWN_BASHRC_RUNS = 20
SPLIT_RUNS = 100  # round trips of the stream("true") split (enough for its p50)


# ----------------------------------------------------------------------------- helpers


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without any XCLOUD_* setting, plus ``extra``; the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCLOUD_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def spawn(cmd: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as logf:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def timed(fn: Callable[[], object], runs: int, warmup: int = WARMUP) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def throughput(fn: Callable[[], int], size: int, reps: int) -> dict[str, Any]:
    """MB/s of ``reps`` transfers; ``fn`` returns the bytes it received (checked)."""
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = fn()
        dt = time.perf_counter() - t0
        if got != size:
            raise RuntimeError(f"streamed {got} bytes, expected {size}")
        rates.append(size / MB / dt)
    return {"mb": size / MB, "reps": reps, "mb_s": percentile(rates, 50),
            "min": min(rates), "max": max(rates), "all": rates}


def read_pipe(cmd: list[str]) -> int:
    """Run ``cmd``, count the bytes of its stdout (read in 1 MiB pieces), check the exit."""
    n = 0
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        assert isinstance(proc.stdout, io.BufferedReader)  # stdout=PIPE, default bufsize
        while chunk := proc.stdout.read1(1 << 20):
            n += len(chunk)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} … exited with {proc.returncode}")
    return n


def run_quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = min(left, 4 << 20)
            fh.write(os.urandom(piece))
            left -= piece
    return path


def process_cpu(pid: int, tree: bool = False) -> Callable[[], float]:
    """CPU seconds of ``pid`` (with ``tree``, plus its live descendants), reaped
    children included."""
    proc = psutil.Process(pid)

    def cpu() -> float:
        total = 0.0
        for p in [proc, *(proc.children(recursive=True) if tree else [])]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    return cpu


def reaped_children_cpu() -> float:
    """CPU seconds of the children this process has reaped (``subprocess.run`` ones)."""
    t = os.times()
    return float(t.children_user + t.children_system)


class CpuMeters:
    """CPU seconds of named sources over a window, per call."""

    def __init__(self, sources: dict[str, Callable[[], float]]) -> None:
        self.sources = sources
        self._c0: dict[str, float] = {}

    @classmethod
    def of_pids(cls, pids: dict[str, int]) -> CpuMeters:
        sources = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                sources[name] = process_cpu(pid)
        return cls(sources)

    def start(self) -> CpuMeters:
        self._c0 = {}
        for name, cpu in self.sources.items():
            with contextlib.suppress(psutil.Error):
                self._c0[name] = cpu()
        return self

    def per_call_ms(self, calls: int) -> dict[str, float]:
        out = {}
        for name, cpu in self.sources.items():
            with contextlib.suppress(psutil.Error, KeyError):
                out[name] = 1000.0 * (cpu() - self._c0[name]) / max(1, calls)
        return out


# ----------------------------------------------------------------------------- grids


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
    (``bench.common.MosquittoBroker``); ``amqtt``: ``xcloud broker`` (the embedded broker
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


# ----------------------------------------------------------------------------- xcloud


def wait_online(grid: Any, timeout: float = 90.0) -> None:
    from broker.bus import BusError
    from client.errors import ClientError

    def online() -> bool:
        try:
            return bool(grid.workers(state=["online"]))
        except (BusError, ClientError):
            return False

    wait_until(online, timeout, 0.2, "an online worker")


def measure_xcloud(xgrid: XcloudGrid, runs: int, size: int, reps: int,
                   host_file: Path | None) -> dict[str, Any]:
    """RTT of ``true`` (run and stream split), CPU per command, and ``cat`` MB/s."""
    from client.api import Grid

    out: dict[str, Any] = {"label": xgrid.label}
    t0 = time.monotonic()
    with Grid.connect(xgrid.config) as grid:
        wait_online(grid)
        out["ready_s"] = round(time.monotonic() - t0, 2)
        t1 = time.perf_counter()
        w = grid.reserve(lease_s=LEASE_S)
        out["reserve_ms"] = 1000 * (time.perf_counter() - t1)
        xgrid.reservations.append(w.id)
        with w:
            def run_true() -> None:
                result = w.run("true")
                if result.exit_code != 0:
                    raise RuntimeError(f"`true` failed: {result}")

            for _ in range(WARMUP):
                run_true()
            meters = CpuMeters.of_pids({**xgrid.pids(), "client (this process)": os.getpid()})
            meters.start()
            out["run_true"] = latency_ms(timed(run_true, runs, warmup=0))
            out["cpu_ms_per_exec"] = meters.per_call_ms(runs)

            started: list[float] = []
            ended: list[float] = []

            def stream_true() -> None:
                t = time.perf_counter()
                stream = w.stream("true")
                started.append(time.perf_counter() - t)
                for _ in stream:
                    pass
                ended.append(time.perf_counter() - t)
                if stream.result.exit_code != 0:
                    raise RuntimeError(f"`true` failed: {stream.result}")

            timed(stream_true, min(runs, SPLIT_RUNS))  # the first WARMUP are warm-ups
            out["stream_started"] = latency_ms(started[WARMUP:])
            out["stream_exit"] = latency_ms(ended[WARMUP:])

            if host_file is not None:
                path = shlex.quote(str(host_file))
            else:  # docker executor: make the file inside the session (/work)
                made = w.run(f"head -c {size} /dev/urandom > big.bin && wc -c < big.bin",
                             timeout=300)
                if made.exit_code != 0 or made.text.strip() != str(size):
                    raise RuntimeError(f"could not make the file: {made}")
                path = "big.bin"

            def cat() -> int:
                stream = w.stream(f"cat {path}", max_output_bytes=size + 1)
                n = sum(len(chunk.data) for chunk in stream)
                if stream.result.exit_code != 0:
                    raise RuntimeError(f"cat failed: {stream.result}")
                return n

            cat()  # warm: page cache, paths
            out["cat"] = throughput(cat, size, reps)
    return out


def run_grid(xgrid: XcloudGrid, runs: int, size: int, reps: int,
             host_file: Path | None) -> dict[str, Any]:
    with xgrid:
        try:
            return measure_xcloud(xgrid, runs, size, reps, host_file)
        except Exception as err:
            raise RuntimeError(f"{xgrid.label}: {err}\n{xgrid.diagnostics()}") from err


# ----------------------------------------------------------------------------- ssh


class SshServer:
    """A private sshd on a free port and a ControlMaster connection to it, as root."""

    def __init__(self, workdir: Path, mask_bashrc: bool = True) -> None:
        self.dir = workdir / f"ssh-{uuid.uuid4().hex[:6]}"
        self.mask_bashrc = mask_bashrc
        self.bashrc = "as is"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.control = self.dir / "cm.sock"
        self.master_pid: int | None = None

    def client_args(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                "-p", str(self.port), f"root@{LOCALHOST}"]

    def start(self, timeout: float = 15.0) -> SshServer:
        for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing (apt-get install -y openssh-server)")
        self.dir.mkdir(parents=True)
        host_key, user_key = self.dir / "host_ed25519", self.dir / "user_ed25519"
        for key in (host_key, user_key):
            run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        auth = self.dir / "authorized_keys"
        shutil.copy(user_key.with_suffix(".pub"), auth)
        auth.chmod(0o600)
        conf = self.dir / "sshd_config"
        conf.write_text("\n".join([
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {auth}",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PrintMotd no",
            f"PidFile {self.dir / 'sshd.pid'}",
            "LogLevel ERROR",
        ]) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        log_file = self.dir / "sshd.log"
        prefix = self._mask_prefix()
        for attempt in range(3):
            self.port = free_port()
            sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf), "-p", str(self.port),
                    "-o", f"ListenAddress={LOCALHOST}"]
            cmd = [*prefix[:-1], f"{prefix[-1]} {shlex.join(sshd)}"] if prefix else sshd
            with open(log_file, "ab") as logf:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if port_open(LOCALHOST, self.port):
                    break
                time.sleep(0.02)
            if self.proc.poll() is None and port_open(LOCALHOST, self.port):
                break
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"sshd did not start:\n{tail(log_file)}")
        subprocess.run(
            ["ssh", "-F", "/dev/null", "-i", str(user_key), "-o", "IdentitiesOnly=yes",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
             "-o", "ControlMaster=yes", "-o", f"ControlPath={self.control}",
             "-o", "ControlPersist=yes", "-N", "-f", "-p", str(self.port),
             f"root@{LOCALHOST}"], check=True, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=30)
        check = subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                                "-O", "check", f"root@{LOCALHOST}"],
                               capture_output=True, text=True, timeout=10, check=False)
        text = check.stderr + check.stdout
        if "pid=" in text:
            self.master_pid = int(text.split("pid=")[1].split(")")[0])
        return self

    def _mask_prefix(self) -> list[str]:
        """``unshare`` + ``sh -c`` that hides root's ``~/.bashrc`` from this sshd only.

        bash sources ``~/.bashrc`` for commands run by sshd; root's here runs
        ``pyenv init`` (a quarter of a second), which is this machine's setup, not ssh's
        cost. A private mount namespace binds an empty file over it for sshd and its
        sessions alone; nothing outside sees a change.
        """
        bashrc = Path(os.path.expanduser("~root")) / ".bashrc"
        if not self.mask_bashrc or not bashrc.is_file() or shutil.which("unshare") is None:
            return []
        empty = self.dir / "empty_bashrc"
        empty.write_text("")
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(bashrc))}"],
            capture_output=True, timeout=10, check=False)
        if probe.returncode != 0:
            return []
        self.bashrc = "empty (masked)"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(bashrc))} && exec"]

    def cipher(self) -> str:
        """The cipher the master negotiated (from ``ssh -G``'s defaults: first offered)."""
        out = subprocess.run(["ssh", "-F", "/dev/null", "-G", f"root@{LOCALHOST}"],
                             capture_output=True, text=True, timeout=10, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("ciphers "):
                return line.split()[1].split(",")[0]
        return "?"

    def version(self) -> str:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10,
                             check=False)
        return (out.stderr or out.stdout).strip()

    def stop(self) -> None:
        if self.control.exists():
            subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={self.control}",
                            "-O", "exit", f"root@{LOCALHOST}"], capture_output=True,
                           timeout=10, check=False)
        if self.master_pid is not None:
            with contextlib.suppress(psutil.Error):
                master = psutil.Process(self.master_pid)
                if master.name() == "ssh":
                    master.terminate()
                    master.wait(5)
            self.master_pid = None
        proc, self.proc = self.proc, None
        stop_process(proc, 10)

    def __enter__(self) -> SshServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def measure_ssh(workdir: Path, runs: int, size: int, reps: int,
                host_file: Path) -> dict[str, Any]:
    with SshServer(workdir) as sshd:
        base = sshd.client_args()
        out: dict[str, Any] = {"version": sshd.version(), "cipher": sshd.cipher(),
                               "bashrc": sshd.bashrc}
        ssh_true = [*base, "true"]
        for _ in range(WARMUP):
            run_quiet(ssh_true)
        sources = {"ssh clients": reaped_children_cpu}
        if sshd.proc is not None:
            sources["sshd"] = process_cpu(sshd.proc.pid, tree=True)
        if sshd.master_pid is not None:
            sources["ssh master"] = process_cpu(sshd.master_pid)
        meters = CpuMeters(sources).start()
        out["run_true"] = latency_ms(timed(lambda: run_quiet(ssh_true), runs, warmup=0))
        out["cpu_ms_per_exec"] = meters.per_call_ms(runs)
        cat = [*base, "cat", shlex.quote(str(host_file))]
        read_pipe(cat)
        out["cat"] = throughput(lambda: read_pipe(cat), size, reps)
    if sshd.bashrc != "as is":
        # For the record: the same with root's own ~/.bashrc (few runs, it is slow).
        with SshServer(workdir, mask_bashrc=False) as plain:
            base = plain.client_args()
            out["run_true_own_bashrc"] = latency_ms(
                timed(lambda: run_quiet([*base, "true"]), SSH_OWN_BASHRC_RUNS, warmup=2))
    return out


# ----------------------------------------------------------------------------- docker exec


@contextlib.contextmanager
def busybox_container(image: str, host_file: Path) -> Iterator[str]:
    name = f"xcloud-bench-exec-{uuid.uuid4().hex[:8]}"
    cid = subprocess.run(
        ["docker", "run", "-d", "--rm", "--network", "none", "--name", name,
         "--label", "xcloud.bench=exec_rtt", "-v", f"{host_file}:/data/big.bin:ro",
         image, "sleep", "3600"], capture_output=True, text=True, timeout=120,
        check=True).stdout.strip()
    try:
        yield cid
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60,
                       check=False)


def measure_docker_exec(runs: int, size: int, reps: int, host_file: Path,
                        image: str) -> dict[str, Any]:
    import docker

    client = docker.from_env()
    api = client.api
    out: dict[str, Any] = {"image": image, "engine": client.version().get("Version", "?")}
    try:
        with busybox_container(image, host_file) as cid:
            out["cli_true"] = latency_ms(timed(lambda: run_quiet(
                ["docker", "exec", cid, "true"]), runs))

            def sdk_true() -> None:
                exec_id = api.exec_create(cid, ["true"])["Id"]
                api.exec_start(exec_id)
                if api.exec_inspect(exec_id)["ExitCode"] != 0:
                    raise RuntimeError("true failed")

            out["sdk_true"] = latency_ms(timed(sdk_true, runs))
            cat = ["docker", "exec", cid, "cat", "/data/big.bin"]
            read_pipe(cat)
            out["cli_cat"] = throughput(lambda: read_pipe(cat), size, reps)

            def sdk_cat() -> int:
                exec_id = api.exec_create(cid, ["cat", "/data/big.bin"])["Id"]
                n = sum(len(piece) for piece in api.exec_start(exec_id, stream=True))
                if api.exec_inspect(exec_id)["ExitCode"] != 0:
                    raise RuntimeError("cat failed")
                return n

            sdk_cat()
            out["sdk_cat"] = throughput(sdk_cat, size, reps)
    finally:
        client.close()
    return out


def measure_local(runs: int, size: int, reps: int, host_file: Path) -> dict[str, Any]:
    return {
        "run_true": latency_ms(timed(lambda: run_quiet(["true"]), runs)),
        "cat": throughput(lambda: read_pipe(["cat", str(host_file)]), size, reps),
    }


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, runs: int | None = None, mb: float | None = None,
        reps: int | None = None, only: str = ",".join(DEFAULT_VARIANTS),
        image: str = IMAGE) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    n = runs or sizes["runs"]
    size = int((mb or sizes["mb"]) * MB)
    k = reps or sizes["reps"]
    chosen = [v.strip() for v in only.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    started = time.monotonic()
    result: dict[str, Any] = {"runs": n, "warmup": WARMUP, "bytes": size, "reps": k,
                              "image": image, "variants": chosen,
                              "machine_cpu_before_pct": wait_for_quiet(
                                  max_wait=5 if quick else 20)}
    res: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with scratch_dir("xcloud-exec-") as tmp:
        host_file = make_file(tmp / "big.bin", size)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("local", lambda: measure_local(n, size, k, host_file)),
            ("ssh", lambda: measure_ssh(tmp, n, size, k, host_file)),
            ("docker-exec", lambda: measure_docker_exec(n, size, k, host_file, image)),
            ("amqtt", lambda: run_grid(UpGrid(tmp), n, size, k, host_file)),
            ("mosquitto", lambda: run_grid(SplitGrid(tmp), n, size, k, host_file)),
            ("amqtt-own", lambda: run_grid(SplitGrid(tmp, "amqtt"), n, size, k, host_file)),
            ("amqtt-thread", lambda: run_grid(UpGrid(tmp, broker_thread=True), n, size, k,
                                              host_file)),
            ("docker", lambda: run_grid(UpGrid(tmp, "docker", image), n, size, k, None)),
        ]
        for name, step in steps:
            if name not in chosen:
                continue
            t0 = time.monotonic()
            print(f"exec_rtt: {name} …", file=sys.stderr, flush=True)
            try:
                res[name] = step()
                res[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
            except Exception as err:  # report the others anyway
                errors[name] = f"{type(err).__name__}: {err}"
                print(f"exec_rtt: {name} failed: {errors[name]}", file=sys.stderr, flush=True)
    result["results"] = res
    result["errors"] = errors
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


# ----------------------------------------------------------------------------- report


def _p50(res: dict[str, Any], name: str, key: str) -> float | None:
    stats = res.get(name, {}).get(key)
    return stats["p50"] if stats else None


def _rate(res: dict[str, Any], name: str, key: str) -> float | None:
    stats = res.get(name, {}).get(key)
    return stats["mb_s"] if stats else None


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def markdown(result: dict[str, Any]) -> str:
    res = result["results"]
    ssh_p50 = _p50(res, "ssh", "run_true")
    dex_p50 = _p50(res, "docker-exec", "cli_true")
    rtt_rows = [
        ("amqtt", "run_true", "xcloud, embedded amqtt (`xcloud up`), process executor"),
        ("amqtt-thread", "run_true", "xcloud, `xcloud up` with the broker in a thread "
         "(broker.own_process = false), process executor"),
        ("mosquitto", "run_true", "xcloud, Mosquitto, process executor"),
        ("amqtt-own", "run_true", "xcloud, amqtt in its own process (`xcloud broker`), "
         "process executor"),
        ("docker", "run_true", "xcloud, embedded amqtt, docker executor (busybox)"),
        ("ssh", "run_true", "`ssh` over a ControlMaster"),
        ("ssh", "run_true_own_bashrc", "`ssh` over a ControlMaster, root's own ~/.bashrc"),
        ("docker-exec", "cli_true", "`docker exec` (CLI)"),
        ("docker-exec", "sdk_true", "docker SDK exec_create/start/inspect"),
        ("local", "run_true", "local fork+exec (`subprocess.run`), the floor"),
    ]
    rows = []
    for name, key, label in rtt_rows:
        stats = res.get(name, {}).get(key)
        if not stats:
            continue
        rows.append([label, stats["n"], fmt(stats["p50"], 2), fmt(stats["p99"], 2),
                     fmt(stats["mean"], 2), ratio(stats["p50"], ssh_p50),
                     ratio(stats["p50"], dex_p50)])
    m = result.get("machine", {})
    out = [f"Exec round trip of `true`, N = {result['runs']} after {result['warmup']} "
           f"warm-up calls, wall clock in the caller ({machine_line(m) if m else ''})", "",
           md_table(["path", "n", "p50 ms", "p99 ms", "mean ms", "p50 ÷ ssh",
                     "p50 ÷ docker exec"], rows)]

    split, cpu_rows = [], []
    for name in ("amqtt", "mosquitto", "amqtt-own", "docker", "ssh"):
        r = res.get(name)
        if not r:
            continue
        label = r.get("label", "ssh over a ControlMaster")
        if "stream_exit" in r:
            split.append([label, r["stream_exit"]["n"], fmt(r["stream_started"]["p50"], 2),
                          fmt(r["stream_exit"]["p50"], 2), fmt(r["stream_exit"]["p99"], 2)])
        cpu = r.get("cpu_ms_per_exec") or {}
        if cpu:
            cpu_rows.append([label, fmt(sum(cpu.values()), 2),
                             ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())])
    if split:
        out += ["", "Where an xcloud round trip goes: `stream(\"true\")`, until the "
                "`exec.started` reply and until `exec.exit`", "",
                md_table(["grid", "n", "started p50 ms", "exit p50 ms", "exit p99 ms"],
                         split)]
    if cpu_rows:
        out += ["", "CPU per command in the round-trip loop (ms; reaped children included; "
                "the clock ticks are 10 ms, so ± 10 ms / n)", "",
                md_table(["path", "CPU ms per command", "by process"], cpu_rows)]

    ssh_rate = _rate(res, "ssh", "cat")
    dex_rate = _rate(res, "docker-exec", "cli_cat")
    thr_rows = [
        ("amqtt", "cat", "xcloud, embedded amqtt, process executor"),
        ("mosquitto", "cat", "xcloud, Mosquitto, process executor"),
        ("amqtt-own", "cat", "xcloud, amqtt in its own process, process executor"),
        ("docker", "cat", "xcloud, embedded amqtt, docker executor"),
        ("ssh", "cat", "`ssh … cat` over the ControlMaster"),
        ("docker-exec", "cli_cat", "`docker exec … cat` (CLI)"),
        ("docker-exec", "sdk_cat", "docker SDK exec_start(stream=True)"),
        ("local", "cat", "local `cat` into a pipe, the ceiling"),
    ]
    rows = []
    for name, key, label in thr_rows:
        stats = res.get(name, {}).get(key)
        if not stats:
            continue
        rows.append([label, fmt(stats["mb"]), fmt(stats["mb_s"], 1),
                     f"{stats['min']:.1f}–{stats['max']:.1f}", ratio(stats["mb_s"], ssh_rate),
                     ratio(stats["mb_s"], dex_rate)])
    if rows:
        out += ["", f"Streaming `cat` of a file of random bytes, median of {result['reps']} "
                "after one warm-up, bytes counted by the reader", "",
                md_table(["path", "MB", "MB/s", "range", "÷ ssh", "÷ docker exec"], rows)]

    a_p50 = _p50(res, "amqtt", "run_true")
    rates = [r for r in (_rate(res, "amqtt", "cat"), _rate(res, "mosquitto", "cat"))
             if r is not None]
    extra = ""
    if "ssh" in res:
        extra = (f"; ssh: {res['ssh']['version']}, cipher {res['ssh']['cipher']}, "
                 f"remote ~/.bashrc {res['ssh']['bashrc']}")
    if "docker-exec" in res:
        extra += f"; Docker Engine {res['docker-exec']['engine']}"
    out += ["", "Targets: "
            f"p50 ≤ 5 ms on the embedded broker: "
            f"{verdict(None if a_p50 is None else a_p50 <= 5.0)}; "
            f"≤ 0.5× ssh's p50 (issue 13): "
            f"{verdict(None if a_p50 is None or ssh_p50 is None else a_p50 <= 0.5 * ssh_p50)}; "
            f"≥ 50 MB/s streamed: {verdict(min(rates) >= 50 if rates else None)}"
            f"{extra}."]
    if result.get("errors"):
        out += ["", "Failed: " + "; ".join(f"{k}: {v.splitlines()[0]}"
                                           for k, v in result["errors"].items())]
    load = result.get("load")
    if load:
        out += ["", f"Other processes used {load['others_pct']:.0f} % of the machine during "
                f"the run ({result['elapsed_s']} s)."]
    return "\n".join(out)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None, help="round trips per variant")
    parser.add_argument("--mb", type=float, default=None, help="MB streamed per transfer")
    parser.add_argument("--reps", type=int, default=None, help="transfers per variant")
    parser.add_argument("--only", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: "
                        "all but amqtt-own)")
    parser.add_argument("--image", default=IMAGE, help="busybox image for docker runs")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" not in args and not any(a.startswith("--json=") for a in args):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args += ["--json", str(RESULTS_DIR / f"exec_rtt-{stamp}.json")]
    return cli("exec_rtt", __doc__ or "", run, markdown, add_args, argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
