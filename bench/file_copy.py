"""Files through the grid: ``put`` / ``get`` to a reserved worker and ``xcloud data``
beside the raw paho ceiling, ``scp`` and ``docker cp``, with every side's peak RSS.

The grid runs as separate processes, as ``bench.xcloud_grids`` wires it: ``amqtt``
is ``xcloud up --workers 1`` (embedded broker and coordinator in one process, the worker a
child; process executor), ``mosquitto`` is Mosquitto, ``xcloud coordinator`` and
``xcloud worker``, ``docker`` is ``xcloud up --executor docker`` (busybox image).
This process is the client: it reserves the worker, then times

- ``put`` of one file of random bytes (``ReservedWorker.put``: hash, init, segments,
  acknowledgements with fdatasync, fin with the worker's verification and hand-over
  into the work directory) and ``get`` of it back (verified, renamed into place);
- ``put`` and ``get`` of a directory of many small files (packed to a tar here or on
  the worker first, unpacked on the other side: the tar step is in the time);

and, in the same run, side by side in one table:

- ``xcloud data put`` / ``data get`` of the same file through the coordinator's data
  store (SQLite), each a whole CLI command in its own client process
  (``bench.data_store``), on the amqtt and Mosquitto grids;
- ``docker cp`` of the file into and out of the reservation's container (docker grid);
- the raw paho ceiling on each broker kind (``bench.transfer.measure_paho``: 256 KiB
  QoS 1 payloads, a fresh broker) and ``scp`` to and from 127.0.0.1 through a private
  sshd (``bench.transfer.measure_scp``);
- the coordinator's, the worker's and the client's peak RSS over each call, for a small
  file first (``--rss-mb``, 64 MiB) and then the large one, to show whether memory grows
  with the file (``bench.data_store.PeakRss``; the CLI client's own ``ru_maxrss``),
  after an untimed warm-up ``put`` / ``get`` of other bytes (the same bytes would
  be found in the content-addressed data store and not sent).

MB/s = 10^6 bytes / wall time of the call. Nothing is asserted; the targets of issue 9
(>= 150 MB/s through Mosquitto, >= 0.8x raw paho on each broker, RSS flat in the file
size) are reported as met or missed, with the other processes' share of the machine.

    python -m bench.file_copy [--quick] [--size-mb 1024] [--rss-mb 64]
                              [--variants amqtt,mosquitto,docker] [--no-scp] [--no-paho]
                              [--no-data]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.cpu_load import LoadMonitor, wait_for_quiet
from bench.data_store import PeakRss, measure_data, role_pids, warmup_file
from bench.machine import machine_line
from bench.report import cli, fmt, md_table, ratio
from bench.scratch import scratch_dir
from bench.xcloud_grids import LEASE_S, SplitGrid, UpGrid, XcloudGrid, wait_online

MB = 1_000_000
MIB = 1 << 20
VARIANTS = ("amqtt", "mosquitto", "docker")
TARGET_MB_S = 150.0  # issue 9: through Mosquitto
TARGET_RATIO = 0.8  # of the raw paho figure on the same broker
RSS_FLAT_MIB = 16  # "flat": the large file's peak at most this much above the small one's


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MIB))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def make_dir(root: Path, files: int, size: int) -> int:
    for i in range(files):
        sub = root / f"d{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(os.urandom(size))
    return files * size


def measure(xgrid: XcloudGrid, work: Path, files: list[tuple[Path, str]], tree: Path,
            tree_bytes: int, data: bool) -> dict[str, Any]:
    """``put`` / ``get`` of each file (smallest first) to a reserved worker with the
    coordinator's, the worker's and this client process's peak RSS over each call;
    ``docker cp`` of the largest on a docker grid; the directory; then ``xcloud data``."""
    from client.api import Grid

    pids = {**role_pids(xgrid), "client": os.getpid()}
    out: dict[str, Any] = {"label": xgrid.label, "sizes": {}}
    load = LoadMonitor().start()
    with Grid.connect(xgrid.config) as grid:
        wait_online(grid)
        w = grid.reserve(lease_s=LEASE_S)
        xgrid.reservations.append(w.id)
        with w:
            # Untimed warm-up: the first call's lazy imports and thread starts would
            # otherwise read as growth with the file size.
            w.put(warmup_file(work), "warmup.bin")
            w.get("warmup.bin", work / "warmup.bin")
            (work / "warmup.bin").unlink()
            for src, sha256 in files:
                size = src.stat().st_size
                remote = f"file-{size}.bin"
                with PeakRss(pids) as up_rss:
                    t0 = time.perf_counter()
                    put = w.put(src, remote)
                    up_s = time.perf_counter() - t0
                if put.sha256 != sha256:
                    raise RuntimeError("the worker holds other bytes than were put")
                back = work / "back.bin"
                with PeakRss(pids) as down_rss:
                    t0 = time.perf_counter()
                    got = w.get(remote, back)
                    down_s = time.perf_counter() - t0
                if got.sha256 != sha256 or back.stat().st_size != size:
                    raise RuntimeError("the file came back different")
                back.unlink()
                out["sizes"][str(size)] = {"put_mb_s": size / MB / up_s,
                                           "get_mb_s": size / MB / down_s,
                                           "rss_up": up_rss.mib, "rss_down": down_rss.mib}
            if "docker executor" in xgrid.label:
                out.update(measure_docker_cp(w.id, files[-1][0], work))
            t0 = time.perf_counter()
            w.put(tree, "tree")
            out["put_dir_mb_s"] = tree_bytes / MB / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            w.get("tree", work / "tree-back")
            out["get_dir_mb_s"] = tree_bytes / MB / (time.perf_counter() - t0)
            shutil.rmtree(work / "tree-back", ignore_errors=True)
    if data:
        out["data"] = measure_data(xgrid, work, files)
    out["load"] = load.stop()
    return out


def measure_docker_cp(session_id: str, src: Path, work: Path) -> dict[str, float]:
    """``docker cp`` of the same file into and out of the reservation's container: what a
    user with the docker CLI on the worker's machine would do instead of ``put``/``get``."""
    import subprocess

    import docker
    from worker.executors.docker.container import LABEL_SESSION

    engine = docker.from_env()
    try:
        found = engine.containers.list(filters={"label": f"{LABEL_SESSION}={session_id}"})
    finally:
        engine.close()
    if not found:
        raise RuntimeError(f"no container for reservation {session_id}")
    name = found[0].name
    size = src.stat().st_size
    t0 = time.perf_counter()
    subprocess.run(["docker", "cp", str(src), f"{name}:/work/cp-bench.bin"], check=True,
                   capture_output=True)
    up = size / MB / (time.perf_counter() - t0)
    back = work / "cp-back.bin"
    t0 = time.perf_counter()
    subprocess.run(["docker", "cp", f"{name}:/work/cp-bench.bin", str(back)], check=True,
                   capture_output=True)
    down = size / MB / (time.perf_counter() - t0)
    back.unlink()
    return {"docker_cp_in_mb_s": up, "docker_cp_out_mb_s": down}


def run(quick: bool = False, size_mb: int | None = None, rss_mb: int | None = None,
        variants: str = "amqtt,mosquitto,docker", no_scp: bool = False,
        no_paho: bool = False, no_data: bool = False) -> dict[str, Any]:
    size = (size_mb if size_mb is not None else (64 if quick else 1024)) * MIB
    small_mib = rss_mb if rss_mb is not None else (16 if quick else 64)
    small = small_mib * MIB if 0 < small_mib * MIB < size else 0
    files, file_size = (200, 16 * 1024) if quick else (1000, 64 * 1024)
    chosen = [v for v in variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    result: dict[str, Any] = {"size": size, "small": small, "dir_files": files,
                              "dir_file_size": file_size,
                              "quiet_pct": wait_for_quiet(5 if quick else 20),
                              "results": {}, "errors": {}, "paho": {}}
    with scratch_dir("xcloud-bench-cp-") as work:
        sources = []
        for n in ([small] if small else []) + [size]:
            src = work / f"file-{n}.bin"
            sources.append((src, make_file(src, n)))
        tree = work / "tree"
        tree_bytes = make_dir(tree, files, file_size)
        grids: dict[str, Any] = {
            "amqtt": lambda: UpGrid(work),
            "mosquitto": lambda: SplitGrid(work),
            "docker": lambda: UpGrid(work, "docker"),
        }
        if not no_paho:
            result["paho"] = measure_paho_ceilings(chosen, work, size)
        for name in chosen:
            print(f"file_copy: {name} …", file=sys.stderr, flush=True)
            xgrid = grids[name]()
            try:
                with xgrid:
                    result["results"][name] = measure(xgrid, work, sources, tree, tree_bytes,
                                                      data=not no_data and name != "docker")
            except Exception as err:  # report the others anyway
                result["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
                print(f"file_copy: {name} failed: {result['errors'][name]}\n"
                      f"{xgrid.diagnostics()}", file=sys.stderr, flush=True)
        if not no_scp:
            from bench.transfer import measure_scp

            try:
                result["scp"] = measure_scp(work, sources[-1][0])
            except Exception as err:  # no sshd here: say so in the table
                result["scp"] = {"error": str(err).splitlines()[0][:200]}
    return result


def measure_paho_ceilings(chosen: list[str], work: Path, size: int) -> dict[str, Any]:
    """The raw paho ceiling (``bench.transfer.measure_paho``: 256 KiB QoS 1 payloads)
    on a fresh broker of each kind the grids use; an error is kept as the row."""
    from bench.identities import identities
    from bench.scratch import unique_root
    from bench.transfer import measure_paho

    ids = identities(("hub", "coordinator"), ("alice", "client"))
    out: dict[str, Any] = {}
    for kind in ("amqtt", "mosquitto"):
        wanted = {"amqtt", "docker"} if kind == "amqtt" else {"mosquitto"}
        if not wanted & set(chosen):
            continue
        print(f"file_copy: raw paho on {kind} …", file=sys.stderr, flush=True)
        try:
            out[kind] = measure_paho(kind, ids, unique_root("cp"), work, size)
        except Exception as err:
            out[kind] = {"error": f"{type(err).__name__}: {err}"[:200]}
    return out


def _rss(recs: list[dict[str, Any]], direction: str, role: str) -> str:
    """``small → big`` peak RSS MiB of ``role`` over the up/down calls of each size."""
    vals = [r[direction].get(role) for r in recs]
    return " → ".join("–" if v is None else f"{v:.0f}" for v in vals)


def _rows(label: str, recs: list[dict[str, Any]], up: str, down: str,
          paho: dict[str, Any] | None, roles: tuple[str, ...]) -> list[str]:
    big = recs[-1]
    ceiling = (paho or {}).get("mb_s")
    row = [label, fmt(big[up]), fmt(big[down]),
           f"{ratio(big[up], ceiling)} / {ratio(big[down], ceiling)}" if ceiling else "–"]
    for role in ("coordinator", "worker", "client"):
        row.append(f"{_rss(recs, 'rss_up', role)} / {_rss(recs, 'rss_down', role)}"
                   if role in roles else "–")
    return row


def markdown(result: dict[str, Any]) -> str:
    size, small = result["size"], result.get("small", 0)
    sizes = [str(n) for n in ([small] if small else []) + [size]]
    paho = result.get("paho") or {}
    rows: list[list[str]] = []
    names = {"amqtt": "amqtt (own process)", "mosquitto": "Mosquitto"}
    for kind, res in paho.items():
        if "mb_s" in res:
            rows.append([f"raw paho ceiling, {names[kind]}", fmt(res["mb_s"]),
                         fmt(res["mb_s"]), "1.00×", "–", "–", "–"])
        else:
            rows.append([f"raw paho, {kind}: {res['error']}"] + ["–"] * 6)
    dash = ["–"] * 4
    for name, res in result["results"].items():
        ceiling = paho.get("mosquitto" if name == "mosquitto" else "amqtt")
        recs = [res["sizes"][n] for n in sizes]
        rows.append(_rows(f"put / get, reserved worker, {res['label']}", recs, "put_mb_s",
                          "get_mb_s", ceiling, ("coordinator", "worker", "client")))
        if "data" in res:
            drecs = [res["data"]["sizes"][n] for n in sizes]
            rows.append(_rows(f"`xcloud data put / get` (coordinator, SQLite), {res['label']}",
                              drecs, "up_mb_s", "down_mb_s", ceiling,
                              ("coordinator", "client")))
        if "docker_cp_in_mb_s" in res:
            rows.append(["`docker cp` into / out of the same container",
                         fmt(res["docker_cp_in_mb_s"]), fmt(res["docker_cp_out_mb_s"]),
                         *dash])
    scp = result.get("scp") or {}
    if "upload_mb_s" in scp:
        rows.append([f"scp 127.0.0.1 ({scp['cipher']})", fmt(scp["upload_mb_s"]),
                     fmt(scp["download_mb_s"]), *dash])
    elif scp:
        rows.append([f"scp: {scp['error']}", "–", "–", *dash])
    for res in result["results"].values():
        rows.append([f"put / get of the directory, {res['label']}", fmt(res["put_dir_mb_s"]),
                     fmt(res["get_dir_mb_s"]), *dash])
    for name, err in result["errors"].items():
        rows.append([f"{name}: {err.splitlines()[0][:80]}", "–", "–", *dash])
    sizes_txt = " → ".join(f"{int(n) / MIB:,.0f} MiB" for n in sizes)
    tree_mib = result["dir_files"] * result["dir_file_size"] / MIB
    head = (f"File copy, one file of {size / MIB:,.0f} MiB (MB/s = 10^6 B / wall time; "
            f"`xcloud data` rows are whole CLI commands), a directory of "
            f"{result['dir_files']} files ({tree_mib:.1f} MiB). "
            f"Peak RSS MiB over each call at {sizes_txt}, up / down.\n\n")
    if "machine" in result:
        head += f"{machine_line(result['machine'])}\n\n"
    table = md_table(["path", "up MB/s", "down MB/s", "vs raw paho (up / down)",
                      "coordinator peak RSS", "worker peak RSS", "client peak RSS"], rows)
    return head + table + "\n\n" + verdicts(result, sizes) + load_line(result)


def verdicts(result: dict[str, Any], sizes: list[str]) -> str:
    """Targets: >= 150 MB/s through Mosquitto, >= 0.8x raw paho, RSS flat in the size."""
    out: list[str] = []
    paho = result.get("paho") or {}
    growth = 0.0
    for name, res in result["results"].items():
        ceiling = (paho.get("mosquitto" if name == "mosquitto" else "amqtt") or {}).get("mb_s")
        pairs = [("put/get", res["sizes"], "put_mb_s", "get_mb_s")]
        if "data" in res:
            pairs.append(("data", res["data"]["sizes"], "up_mb_s", "down_mb_s"))
        for what, recs, up, down in pairs:
            worst = min(recs[sizes[-1]][up], recs[sizes[-1]][down])
            if ceiling:
                out.append(f"{name} {what}: {worst / ceiling:.2f}× raw paho "
                           f"({'met' if worst >= TARGET_RATIO * ceiling else 'missed'})")
            if name == "mosquitto":
                out.append(f"{name} {what} ≥ {TARGET_MB_S:.0f} MB/s: "
                           f"{'met' if worst >= TARGET_MB_S else 'missed'} ({worst:.0f})")
            if len(sizes) > 1:
                for key in ("rss_up", "rss_down"):
                    a, b = recs[sizes[0]][key], recs[sizes[-1]][key]
                    growth = max([growth] + [b[r] - a[r] for r in a if r in b])
    if len(sizes) > 1:
        out.append(f"peak RSS grows by at most {growth:.0f} MiB from the small file to the "
                   f"large ({'flat' if growth <= RSS_FLAT_MIB else 'not flat'}: "
                   f"≤ {RSS_FLAT_MIB} MiB)")
    return "Targets: " + "; ".join(out) + "." if out else ""


def load_line(result: dict[str, Any]) -> str:
    parts = [f"{res['label']} {res['load']['others_pct']:.0f} %"
             for res in result["results"].values() if "load" in res]
    return ("\n\nOther processes' share of the machine while each grid ran: "
            + ", ".join(parts) + f" (CPU before the start {result['quiet_pct']:.0f} %); "
            "rates under other load are lower bounds.") if parts else ""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=int, default=None,
                        help="file size in MiB (default 1024; 64 with --quick)")
    parser.add_argument("--rss-mb", type=int, default=None,
                        help="also a smaller file first, for peak RSS by size (default 64; "
                             "16 with --quick; 0: skip)")
    parser.add_argument("--variants", default="amqtt,mosquitto,docker",
                        help=f"grids to run, of {', '.join(VARIANTS)}")
    parser.add_argument("--no-scp", action="store_true", help="skip the scp comparison")
    parser.add_argument("--no-paho", action="store_true", help="skip the raw paho ceiling")
    parser.add_argument("--no-data", action="store_true", help="skip `xcloud data put/get`")


def main(argv: list[str] | None = None) -> int:
    return cli("file_copy", __doc__.split("\n\n")[0] if __doc__ else "file_copy", run,
               markdown, add_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
