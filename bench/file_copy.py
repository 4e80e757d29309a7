"""Files on a reservation: ``put`` / ``get`` to a reserved worker beside ``scp``.

The grid runs as separate processes, as ``bench.exec_rtt`` wires it: ``amqtt`` is
``xcloud up --workers 1`` (embedded broker and coordinator in one process, the worker a
child; process executor), ``mosquitto`` is Mosquitto, ``xcloud coordinator`` and
``xcloud worker``, ``docker`` (with ``--variants``) is ``xcloud up --executor docker``.
This process is the client: it reserves the worker, then times

- ``put`` of one file of random bytes (``ReservedWorker.put``: hash, init, segments,
  acknowledgements with fdatasync, fin with the worker's verification and hand-over
  into the work directory) and ``get`` of it back (verified, renamed into place);
- ``put`` and ``get`` of a directory of many small files (packed to a tar here or on
  the worker first, unpacked on the other side: the tar step is in the time);

and ``scp`` of the same file to and from 127.0.0.1 through a private sshd
(``bench.transfer.measure_scp``). MB/s = 10^6 bytes / wall time of the call.
Nothing is asserted.

    python -m bench.file_copy [--quick] [--size-mb 256] [--variants amqtt,mosquitto]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import cli, fmt, machine_line, md_table, scratch_dir, wait_for_quiet
from bench.exec_rtt import LEASE_S, SplitGrid, UpGrid, XcloudGrid, wait_online

MB = 1_000_000
MIB = 1 << 20
VARIANTS = ("amqtt", "mosquitto", "docker")


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


def measure(xgrid: XcloudGrid, work: Path, src: Path, sha256: str, tree: Path,
            tree_bytes: int) -> dict[str, Any]:
    from client.api import Grid

    size = src.stat().st_size
    out: dict[str, Any] = {"label": xgrid.label}
    with Grid.connect(xgrid.config) as grid:
        wait_online(grid)
        w = grid.reserve(lease_s=LEASE_S)
        xgrid.reservations.append(w.id)
        with w:
            t0 = time.perf_counter()
            put = w.put(src, "file.bin")
            out["put_mb_s"] = size / MB / (time.perf_counter() - t0)
            if put.sha256 != sha256:
                raise RuntimeError("the worker holds other bytes than were put")
            back = work / "back.bin"
            t0 = time.perf_counter()
            got = w.get("file.bin", back)
            out["get_mb_s"] = size / MB / (time.perf_counter() - t0)
            if got.sha256 != sha256 or back.stat().st_size != size:
                raise RuntimeError("the file came back different")
            back.unlink()
            if "docker executor" in xgrid.label:
                out.update(measure_docker_cp(w.id, src, work))
            t0 = time.perf_counter()
            w.put(tree, "tree")
            out["put_dir_mb_s"] = tree_bytes / MB / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            w.get("tree", work / "tree-back")
            out["get_dir_mb_s"] = tree_bytes / MB / (time.perf_counter() - t0)
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


def run(quick: bool = False, size_mb: int | None = None,
        variants: str = "amqtt,mosquitto", no_scp: bool = False) -> dict[str, Any]:
    size = (size_mb if size_mb is not None else (64 if quick else 1024)) * MIB
    files, file_size = (200, 16 * 1024) if quick else (1000, 64 * 1024)
    chosen = [v for v in variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    result: dict[str, Any] = {"size": size, "dir_files": files, "dir_file_size": file_size,
                              "quiet_pct": wait_for_quiet(5 if quick else 20),
                              "results": {}, "errors": {}}
    with scratch_dir("xcloud-bench-cp-") as work:
        src = work / "file.bin"
        sha256 = make_file(src, size)
        tree = work / "tree"
        tree_bytes = make_dir(tree, files, file_size)
        grids: dict[str, Any] = {
            "amqtt": lambda: UpGrid(work),
            "mosquitto": lambda: SplitGrid(work),
            "docker": lambda: UpGrid(work, "docker"),
        }
        for name in chosen:
            print(f"file_copy: {name} …", file=sys.stderr, flush=True)
            xgrid = grids[name]()
            try:
                with xgrid:
                    result["results"][name] = measure(xgrid, work, src, sha256, tree,
                                                      tree_bytes)
            except Exception as err:  # report the others anyway
                result["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
                print(f"file_copy: {name} failed: {result['errors'][name]}\n"
                      f"{xgrid.diagnostics()}", file=sys.stderr, flush=True)
        if not no_scp:
            from bench.transfer import measure_scp

            try:
                result["scp"] = measure_scp(work, src)
            except Exception as err:  # no sshd here: say so in the table
                result["scp"] = {"error": str(err).splitlines()[0][:200]}
    return result


def markdown(result: dict[str, Any]) -> str:
    size = result["size"]
    tree = result["dir_files"] * result["dir_file_size"]
    rows: list[list[str]] = []
    for res in result["results"].values():
        rows.append([f"xcloud put/get, {res['label']}", fmt(res["put_mb_s"]),
                     fmt(res["get_mb_s"]), fmt(res["put_dir_mb_s"]),
                     fmt(res["get_dir_mb_s"])])
    for res in result["results"].values():
        if "docker_cp_in_mb_s" in res:
            rows.append(["docker cp (same container)", fmt(res["docker_cp_in_mb_s"]),
                         fmt(res["docker_cp_out_mb_s"]), "–", "–"])
    for name, err in result["errors"].items():
        rows.append([f"{name}: {err.splitlines()[0][:80]}", "–", "–", "–", "–"])
    scp = result.get("scp") or {}
    if "upload_mb_s" in scp:
        rows.append([f"scp 127.0.0.1 ({scp['cipher']})", fmt(scp["upload_mb_s"]),
                     fmt(scp["download_mb_s"]), "–", "–"])
    elif scp:
        rows.append([f"scp: {scp['error']}", "–", "–", "–", "–"])
    head = (f"File copy to a reserved worker: one file of {size / MIB:.0f} MiB, a directory "
            f"of {result['dir_files']} files ({tree / MIB:.1f} MiB), MB/s\n\n"
            f"{machine_line(result['machine'])}\n\n") if "machine" in result else ""
    return head + md_table(["", "put (file)", "get (file)", "put (dir)", "get (dir)"], rows)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=int, default=None,
                        help="file size in MiB (default 1024; 64 with --quick)")
    parser.add_argument("--variants", default="amqtt,mosquitto",
                        help=f"grids to run, of {', '.join(VARIANTS)}")
    parser.add_argument("--no-scp", action="store_true", help="skip the scp comparison")


def main(argv: list[str] | None = None) -> int:
    return cli("file_copy", __doc__.split("\n\n")[0] if __doc__ else "file_copy", run,
               markdown, add_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
