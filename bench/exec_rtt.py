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
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.cpu_load import CpuMeters, process_cpu, reaped_children_cpu, wait_for_quiet
from bench.machine import machine_line
from bench.percentiles import latency_ms, percentile
from bench.processes import run_quiet
from bench.report import RESULTS_DIR, cli, fmt, md_table, ratio
from bench.scratch import MB, make_file, scratch_dir
from bench.ssh_server import SshServer
from bench.xcloud_grids import IMAGE, LEASE_S, SplitGrid, UpGrid, XcloudGrid, wait_online

VARIANTS = ("amqtt", "mosquitto", "docker", "ssh", "docker-exec", "local", "amqtt-own",
            "amqtt-thread")
# Opt in: amqtt-own (`xcloud broker` beside `xcloud coordinator`) and amqtt-thread
# (`xcloud up` with broker.own_process = false: broker and coordinator in one process).
DEFAULT_VARIANTS = VARIANTS[:-2]
WARMUP = 10
FULL = {"runs": 300, "mb": 100, "reps": 3}
QUICK = {"runs": 50, "mb": 20, "reps": 2}
SSH_OWN_BASHRC_RUNS = 20
SPLIT_RUNS = 100  # round trips of the stream("true") split (enough for its p50)


# ----------------------------------------------------------------------------- timing


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


# ----------------------------------------------------------------------------- xcloud


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
