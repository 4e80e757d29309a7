"""File transfer throughput: upload and download MB/s of one file through the transfer
engine (``broker.transfer``) between two processes, beside the raw paho ceiling and scp.

For each broker (the embedded amqtt broker in its own process, and Mosquitto):

1. **xcloud**: a *hub* process (coordinator role: a file-system sink and source, as the
   coordinator will have) and a *client* process (``alice``), each a ``Bus`` with a
   ``TransferEndpoint``. The client uploads the file (its SHA-256 computed beforehand
   and passed in, so the time is the transfer's: init, segments, acknowledgements with
   fdatasync, fin with the receiver's verification and atomic hand-over), then downloads
   it back (the holder streams; the client verifies and renames). MB/s = size / wall time
   of ``upload()`` / ``download()``. Each child reports its peak RSS (``ru_maxrss``).
   With ``--rss-mb`` the same runs again for a smaller file in fresh processes, so the
   two peaks show whether memory grows with the file.
2. **raw paho ceiling**: one paho publisher process and one subscriber process on the
   same broker and principals, 256 KiB QoS 1 payloads on the same segment topics, at
   most 64 unacknowledged PUBACKs: the bytes the broker and paho move without any of
   the engine's work (no file I/O, no CRC, no hashing, no acknowledgements).
3. **scp** to and from 127.0.0.1 through a private sshd (``bench.ssh_server.SshServer``,
   over its ControlMaster connection; ``scp -O``, the classic protocol, as that sshd
   has no sftp subsystem), when sshd can be started.

Nothing is asserted; the targets (>= 150 MB/s through Mosquitto, >= 0.8x the raw paho
figure on each broker, RSS flat in the file size) are reported as met or missed.

    python -m bench.transfer [--quick] [--size-mb 1024] [--rss-mb 64]
                             [--brokers amqtt,mosquitto] [--no-scp] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.brokers import start_broker
from bench.cpu_load import wait_for_quiet
from bench.identities import Identity, identities
from bench.machine import machine_line
from bench.paho_clients import paho_close, paho_connect
from bench.processes import LOCALHOST, SPAWN, die_with_parent, quiet_logging
from bench.report import cli, fmt, md_table
from bench.scratch import scratch_dir, unique_root

MB = 1_000_000
MIB = 1 << 20
SEGMENT = 256 * 1024
PAHO_WINDOW = 64
TARGET_MB_S = 150.0
TARGET_RATIO = 0.8


# ----------------------------------------------------------------------------- children


class _Sink:
    """Uploads land in ``<dir>/files/<name>``; partials and states in ``<dir>/partial``."""

    def __init__(self, directory: Path) -> None:
        from broker.transfer import JsonStateStore

        self.files = directory / "files"
        self.partial = directory / "partial"
        self.files.mkdir(parents=True, exist_ok=True)
        self.states = JsonStateStore(self.partial)

    def admit(self, offer: Any) -> Any:
        from broker.transfer import Admission, TransferRefused

        if offer.purpose.get("kind") != "file":
            raise TransferRefused("invalid", "the benchmark takes plain files")
        return Admission()

    def partial_path(self, record: Any) -> Path:
        return self.partial / f"{record.tid}.part"

    def save_state(self, record: Any) -> None:
        self.states.save(record)

    def save_progress(self, record: Any) -> None:
        self.states.save_have(record)

    def load_states(self) -> list[Any]:
        return list(self.states)

    def drop_state(self, record: Any) -> None:
        self.states.delete(record)

    def complete(self, record: Any, partial: Path) -> dict[str, Any]:
        dest = self.files / Path(record.name).name
        os.replace(partial, dest)
        return {"sha256": record.sha256, "size": record.size, "name": dest.name}


class _Source:
    def __init__(self, files: Path, hashes: dict[str, str]) -> None:
        self.files = files
        self.hashes = hashes

    def open_fetch(self, requester: str, source: dict[str, Any]) -> Any:
        from broker.transfer import SourceFile, TransferRefused

        if requester != "alice":
            raise TransferRefused("forbidden", f"{requester} may not read here")
        name = Path(str(source.get("name", ""))).name
        path = self.files / name
        if name not in self.hashes or not path.is_file():
            raise TransferRefused("not_found", f"no {name!r}")
        return SourceFile(path, path.stat().st_size, self.hashes[name], name)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _endpoint_main(conn: Any, url: str, root: str, ident: Identity, role: str,
                   workdir: str, tuning: dict[str, Any]) -> None:
    """Child: a bus and a transfer endpoint; runs commands from the parent's pipe."""
    die_with_parent()
    quiet_logging()
    from broker.bus import Bus
    from broker.config import BusConfig
    from broker.transfer import FileDownloadSink, Peer, TransferEndpoint, TransferSettings
    from schemas.topics import Topics

    topics = Topics(root)
    inbox = topics.coord_inbox if role == "coordinator" else topics.client_inbox(ident.id)
    bus = Bus(BusConfig(url=url, principal=ident.id, token=ident.token, root=root,
                        request_timeout_s=30.0), inbox=inbox)
    hashes: dict[str, str] = {}
    sink = _Sink(Path(workdir)) if role == "coordinator" else None
    source = _Source(sink.files, hashes) if sink is not None else None
    endpoint = TransferEndpoint(bus, sink=sink, source=source,
                                settings=TransferSettings(**tuning))
    bus.start(timeout=30)
    baseline = peak_rss_mib()
    conn.send(("ready", baseline))
    try:
        while True:
            try:
                cmd, *args = conn.recv()
            except EOFError:
                return
            if cmd == "stop":
                return
            if cmd == "serve":  # hub: a file it may stream, and its hash
                hashes[args[0]] = args[1]
                conn.send(("ok",))
            elif cmd == "upload":
                path, sha256 = Path(args[0]), args[1]
                t0 = time.perf_counter()
                result = endpoint.upload(Peer.coordinator(topics, args[2]), path,
                                         purpose={"kind": "file", "name": path.name},
                                         sha256=sha256)
                conn.send(("ok", time.perf_counter() - t0, result.resent, peak_rss_mib()))
            elif cmd == "download":
                name, dest, sha256 = args[0], Path(args[1]), args[2]
                t0 = time.perf_counter()
                endpoint.download(Peer.coordinator(topics, args[3]),
                                  {"kind": "file", "name": name}, dest,
                                  sink=FileDownloadSink(dest, expected_sha256=sha256))
                conn.send(("ok", time.perf_counter() - t0, 0, peak_rss_mib()))
            elif cmd == "rss":
                conn.send(("ok", peak_rss_mib()))
    except Exception as err:  # the parent reports it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        endpoint.close()
        bus.stop()


class Child:
    """A spawned endpoint process driven over a pipe."""

    def __init__(self, url: str, root: str, ident: Identity, role: str, workdir: Path,
                 tuning: dict[str, Any]) -> None:
        parent, child = SPAWN.Pipe()
        self.conn = parent
        self.proc = SPAWN.Process(target=_endpoint_main,
                                  args=(child, url, root, ident, role, str(workdir), tuning),
                                  name=f"bench-xfer-{ident.id}", daemon=True)
        self.proc.start()
        child.close()
        status, self.baseline_mib = self._answer(60)
        assert status == "ready"

    def _answer(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("the transfer child did not answer")
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(reply[1])
        return reply

    def call(self, *cmd: Any, timeout: float = 600) -> Any:
        self.conn.send(cmd)
        return self._answer(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(("stop",))
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def make_file(path: Path, size: int) -> str:
    """Random bytes; returns their SHA-256."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = os.urandom(min(left, 4 * MIB))
            digest.update(piece)
            fh.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def measure_engine(kind: str, ids: dict[str, Identity], root: str, work: Path, src: Path,
                   sha256: str, tuning: dict[str, Any]) -> dict[str, Any]:
    """Upload then download ``src`` between two fresh endpoint processes."""
    size = src.stat().st_size
    run_dir = work / f"{kind}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    with start_broker(kind, ids, root, run_dir) as broker:
        hub = Child(broker.url, root, ids["hub"], "coordinator", run_dir / "hub", tuning)
        client = Child(broker.url, root, ids["alice"], "client", run_dir / "client", tuning)
        try:
            _, up_s, up_resent, _ = client.call("upload", str(src), sha256, "hub")
            hub.call("serve", src.name, sha256)
            dest = run_dir / "back.bin"
            _, down_s, _, client_rss = client.call("download", src.name, str(dest), sha256,
                                                   "hub")
            _, hub_rss = hub.call("rss")
        finally:
            client.stop()
            hub.stop()
        (run_dir / "hub" / "files" / src.name).unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"size": size, "upload_s": up_s, "download_s": down_s,
            "upload_mb_s": size / MB / up_s, "download_mb_s": size / MB / down_s,
            "resent": up_resent, "hub_rss_mib": hub_rss, "client_rss_mib": client_rss,
            "hub_baseline_mib": hub.baseline_mib, "client_baseline_mib": client.baseline_mib}


# ----------------------------------------------------------------------------- raw paho


def _paho_sub_main(conn: Any, url: str, ident: Identity, topic_filter: str, total: int
                   ) -> None:
    die_with_parent()
    got = [0]
    done = threading.Event()
    end = [0.0]

    def on_message(_client: Any, _userdata: Any, msg: Any) -> None:
        got[0] += len(msg.payload)
        if got[0] >= total and not done.is_set():
            end[0] = time.monotonic()
            done.set()

    client = paho_connect(url, ident, on_message=on_message, subscribe=[(topic_filter, 1)])
    conn.send("ready")
    done.wait(600)
    conn.send((end[0], got[0], peak_rss_mib()))
    paho_close(client)


def measure_paho(kind: str, ids: dict[str, Identity], root: str, work: Path, total: int
                 ) -> dict[str, Any]:
    """Raw paho: 256 KiB QoS 1 publishes, at most ``PAHO_WINDOW`` unacknowledged."""
    with start_broker(kind, ids, root, work) as broker:
        parent, child = SPAWN.Pipe()
        sub = SPAWN.Process(target=_paho_sub_main,
                            args=(child, broker.url, ids["hub"],
                                  f"{root}/coord/xfer/alice/+/+/+", total), daemon=True)
        sub.start()
        child.close()
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("paho subscriber did not start")
        ppar, pchild = SPAWN.Pipe()
        pub = SPAWN.Process(target=_paho_pub_main,
                            args=(pchild, broker.url, ids["alice"], root, total), daemon=True)
        pub.start()
        pchild.close()
        try:
            if not ppar.poll(600):
                raise RuntimeError("paho publisher did not finish")
            t0 = ppar.recv()
            if not parent.poll(600):
                raise RuntimeError("paho subscriber did not finish")
            end, got, _ = parent.recv()
        finally:
            for proc in (pub, sub):
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()
    return {"bytes": got, "mb_s": got / MB / (end - t0)}


def _paho_pub_main(conn: Any, url: str, ident: Identity, root: str, total: int) -> None:
    die_with_parent()
    payload = os.urandom(SEGMENT)
    acked = threading.Semaphore(PAHO_WINDOW)
    client = paho_connect(url, ident)
    client.on_publish = lambda *_: acked.release()
    t0 = time.monotonic()
    sent = 0
    n = 0
    while sent < total:
        acked.acquire()
        client.publish(f"{root}/coord/xfer/alice/bench-tid/{n * SEGMENT}/00000000", payload,
                       qos=1)
        sent += SEGMENT
        n += 1
    conn.send(t0)
    for _ in range(PAHO_WINDOW):
        acked.acquire(timeout=60)
    paho_close(client)


# ----------------------------------------------------------------------------- scp


def measure_scp(work: Path, src: Path) -> dict[str, Any]:
    from bench.ssh_server import SshServer

    size = src.stat().st_size
    with SshServer(work) as sshd:
        # -O: the classic scp protocol (the private sshd has no sftp subsystem).
        base = ["scp", "-O", "-q", "-F", "/dev/null", "-o", f"ControlPath={sshd.control}",
                "-P", str(sshd.port)]
        remote = work / "scp-remote.bin"
        back = work / "scp-back.bin"
        t0 = time.perf_counter()
        subprocess.run([*base, str(src), f"root@{LOCALHOST}:{remote}"], check=True,
                       capture_output=True, timeout=600)
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([*base, f"root@{LOCALHOST}:{remote}", str(back)], check=True,
                       capture_output=True, timeout=600)
        down = time.perf_counter() - t0
        cipher = sshd.cipher()
        remote.unlink(missing_ok=True)
        back.unlink(missing_ok=True)
    return {"upload_mb_s": size / MB / up, "download_mb_s": size / MB / down,
            "cipher": cipher}


# ----------------------------------------------------------------------------- the run


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (others' load on a shared machine only slows a run
    down), with every run kept; peak RSS is the highest seen."""
    best = dict(runs[0])
    for key in ("upload_mb_s", "download_mb_s", "mb_s"):
        if key in best:
            best[key] = max(r[key] for r in runs)
    for key in ("hub_rss_mib", "client_rss_mib"):
        if key in best:
            best[key] = max(r[key] for r in runs)
    best["runs"] = runs
    return best


def run(quick: bool = False, size_mb: int | None = None, rss_mb: int = 64,
        brokers: str = "amqtt,mosquitto", no_scp: bool = False, no_paho: bool = False,
        tune: list[str] | None = None, reps: int = 1) -> dict[str, Any]:
    size = (size_mb if size_mb is not None else (64 if quick else 1024)) * MIB
    small = rss_mb * MIB if rss_mb and rss_mb * MIB < size else 0
    kinds = [k for k in brokers.split(",") if k]
    ids = identities(("hub", "coordinator"), ("alice", "client"))
    tuning = parse_tuning(tune or [])
    out: dict[str, Any] = {"size": size, "rss_size": small, "brokers": {}, "tuning": tuning}
    with scratch_dir("xcloud-bench-xfer-") as work:
        src = work / "file.bin"
        sha256 = make_file(src, size)
        small_src = work / "small.bin"
        small_sha = make_file(small_src, small) if small else ""
        for kind in kinds:
            root = unique_root("xfer")
            quiet = wait_for_quiet(30)
            row: dict[str, Any] = {"quiet_pct": quiet}
            for _ in range(max(1, reps)):
                if not no_paho:
                    row.setdefault("paho_runs", []).append(
                        measure_paho(kind, ids, root, work, min(size, 1024 * MIB)))
                row.setdefault("engine_runs", []).append(
                    measure_engine(kind, ids, root, work, src, sha256, tuning))
            if not no_paho:
                row["paho"] = best_of(row.pop("paho_runs"))
            row["engine"] = best_of(row.pop("engine_runs"))
            if small:
                row["engine_small"] = measure_engine(kind, ids, root, work, small_src,
                                                     small_sha, tuning)
            out["brokers"][kind] = row
        if not no_scp:
            try:
                out["scp"] = measure_scp(work, src)
            except Exception as err:  # no sshd here: say so in the table
                out["scp"] = {"error": str(err).splitlines()[0][:200]}
    return out


def parse_tuning(items: list[str]) -> dict[str, Any]:
    """``window=32`` ``fsync=false`` ... -> TransferSettings keyword arguments."""
    from broker.transfer import TransferSettings

    defaults = TransferSettings()
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        current = getattr(defaults, key)  # AttributeError: no such setting
        if isinstance(current, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = type(current)(value)
    return out


def markdown(result: dict[str, Any]) -> str:
    from broker.transfer import TransferSettings

    size_mib = result["size"] / MIB
    s = TransferSettings(**result.get("tuning", {}))
    reps = len(next(iter(result["brokers"].values()))["engine"].get("runs", [1]))
    lines = [f"### File transfer: {size_mib:,.0f} MiB (segments {s.segment_size // 1024} KiB, "
             f"window {s.window}, ack every {s.ack_every}, "
             f"{'fdatasync before every acknowledgement' if s.fsync else 'no fdatasync'}"
             f"{f'; best of {reps} runs' if reps > 1 else ''})", ""]
    if "machine" in result:
        lines += [f"Machine: {machine_line(result['machine'])}", ""]
    rows = []
    for kind, row in result["brokers"].items():
        eng, paho = row["engine"], row.get("paho", {"mb_s": float("nan")})
        label = "Mosquitto" if kind == "mosquitto" else "amqtt (own process)"
        ratio_up = eng["upload_mb_s"] / paho["mb_s"]
        ratio_down = eng["download_mb_s"] / paho["mb_s"]
        rows.append([label, fmt(eng["upload_mb_s"]), fmt(eng["download_mb_s"]),
                     fmt(paho["mb_s"]), f"{ratio_up:.2f}× / {ratio_down:.2f}×",
                     f"{eng['hub_rss_mib']:.0f} / {eng['client_rss_mib']:.0f}",
                     str(eng["resent"])])
    scp = result.get("scp") or {}
    if "upload_mb_s" in scp:
        rows.append([f"scp 127.0.0.1 ({scp['cipher']})", fmt(scp["upload_mb_s"]),
                     fmt(scp["download_mb_s"]), "–", "–", "–", "–"])
    elif scp:
        rows.append([f"scp: {scp['error']}", "–", "–", "–", "–", "–", "–"])
    lines.append(md_table(["path", "upload MB/s", "download MB/s", "raw paho MB/s",
                           "vs paho (up / down)", "peak RSS hub / client MiB", "resent"],
                          rows))
    if result.get("rss_size"):
        small_mib = result["rss_size"] / MIB
        lines += ["", f"Peak RSS (MiB) by file size, fresh processes each: "
                  f"{small_mib:,.0f} MiB vs {size_mib:,.0f} MiB", ""]
        rss_rows = []
        for kind, row in result["brokers"].items():
            small, big = row.get("engine_small"), row["engine"]
            if not small:
                continue
            rss_rows.append([kind, f"{small['hub_rss_mib']:.0f} → {big['hub_rss_mib']:.0f}",
                             f"{small['client_rss_mib']:.0f} → {big['client_rss_mib']:.0f}",
                             f"{big['hub_baseline_mib']:.0f} / {big['client_baseline_mib']:.0f}"])
        lines.append(md_table(["broker", "hub (receives uploads)", "client (receives "
                               "downloads)", "baseline hub / client"], rss_rows))
    verdicts = []
    for kind, row in result["brokers"].items():
        eng, paho = row["engine"], row.get("paho")
        if paho is None:
            continue
        worst = min(eng["upload_mb_s"], eng["download_mb_s"])
        verdicts.append(f"{kind}: {worst / paho['mb_s']:.2f}× raw paho "
                        f"({'met' if worst >= TARGET_RATIO * paho['mb_s'] else 'missed'})")
        if kind == "mosquitto":
            verdicts.append(f"mosquitto ≥ {TARGET_MB_S:.0f} MB/s: "
                            f"{'met' if worst >= TARGET_MB_S else 'missed'} ({worst:.0f})")
    lines += ["", "Targets: " + "; ".join(verdicts) + "."]
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=int, default=None,
                        help="file size in MiB (default 1024; 64 with --quick)")
    parser.add_argument("--rss-mb", type=int, default=64,
                        help="also run this smaller size in fresh processes to compare peak "
                             "RSS (0: skip)")
    parser.add_argument("--brokers", default="amqtt,mosquitto")
    parser.add_argument("--no-scp", action="store_true", help="skip the scp comparison")
    parser.add_argument("--no-paho", action="store_true", help="skip the raw paho ceiling")
    parser.add_argument("--reps", type=int, default=1,
                        help="repeat the paho and engine runs, alternating; report the best")
    parser.add_argument("--tune", nargs="*", metavar="SETTING=VALUE",
                        help="TransferSettings for both ends, e.g. window=32 fsync=false")


def main(argv: list[str] | None = None) -> int:
    return cli("transfer", __doc__.split("\n\n")[0] if __doc__ else "transfer", run,
               markdown, add_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
