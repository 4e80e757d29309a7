"""Stdin throughput: a file piped into a remote command, xcloud beside ``ssh ... cat``.

What ``cat big.bin | xcloud run -- CMD`` costs, measured through the Python API the CLI
uses (``w.run(cmd, input=data)``: ``exec.stdin`` pieces of 1 MiB, a window of 4, each
acknowledged once written; docs/exec.md "Input"), on a held reservation, process
executor: through ``xcloud up`` (embedded amqtt in its own process) and through
Mosquitto (``xcloud coordinator`` and ``xcloud worker`` beside it); beside
``ssh host 'wc -c' < big.bin`` over a ControlMaster to a private sshd on 127.0.0.1
(bench/ssh_server.py's ``SshServer``). The remote command is ``wc -c``, so every byte is
read and the count proves they all arrived. The variants take turns rep by rep
(interleaved), so drift hits them alike.

    python -m bench.stdin_throughput [--quick] [--mb N] [--reps N]

Target (issue 13): stdin >= 100 MB/s.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.percentiles import percentile
from bench.report import cli, fmt, md_table
from bench.scratch import MB, make_file, scratch_dir
from bench.ssh_server import SshServer
from bench.xcloud_grids import LEASE_S, SplitGrid, UpGrid, wait_online

TARGET_MB_S = 100.0


def _xcloud_sender(grid: Any, data: bytes) -> Callable[[], int]:
    w = grid.reserve(lease_s=LEASE_S)

    def send() -> int:
        result = w.run("wc -c", input=data, timeout=600)
        if result.exit_code != 0:
            raise RuntimeError(f"wc -c failed: {result}")
        return int(result.text.strip())

    return send


def _ssh_sender(sshd: SshServer, path: Path) -> Callable[[], int]:
    cmd = [*sshd.client_args(), "wc -c"]

    def send() -> int:
        with path.open("rb") as source:
            out = subprocess.run(cmd, stdin=source, capture_output=True, timeout=600,
                                 check=True)
        return int(out.stdout.strip())

    return send


def run(quick: bool = False, mb: float | None = None, reps: int | None = None
        ) -> dict[str, Any]:
    from client.api import Grid

    size = int((mb or (20 if quick else 100)) * MB)
    reps = reps or (2 if quick else 3)
    result: dict[str, Any] = {"mb": size / MB, "reps": reps, "variants": {}}
    rates: dict[str, list[float]] = {}
    with scratch_dir("xcloud-bench-stdin-") as tmp:
        path = make_file(tmp / "big.bin", size)
        data = path.read_bytes()
        with UpGrid(tmp) as up, SplitGrid(tmp, "mosquitto") as split, SshServer(tmp) as sshd, \
                Grid.connect(up.config) as up_grid, Grid.connect(split.config) as split_grid:
            wait_online(up_grid)
            wait_online(split_grid)
            senders = {"amqtt": _xcloud_sender(up_grid, data),
                       "mosquitto": _xcloud_sender(split_grid, data),
                       "ssh": _ssh_sender(sshd, path)}
            for send in senders.values():  # warm: paths, page cache, the first session
                send()
            for _ in range(reps):
                for name, send in senders.items():
                    t0 = time.perf_counter()
                    got = send()
                    dt = time.perf_counter() - t0
                    if got != size:
                        raise RuntimeError(f"{name}: {got} bytes arrived, expected {size}")
                    rates.setdefault(name, []).append(size / MB / dt)
    for name, values in rates.items():
        result["variants"][name] = {"mb_s": percentile(values, 50), "min": min(values),
                                    "max": max(values), "all": values}
    return result


LABELS = {"amqtt": "xcloud, embedded amqtt (`xcloud up`), process executor",
          "mosquitto": "xcloud, Mosquitto, process executor",
          "ssh": "`ssh … 'wc -c' < file` over a ControlMaster"}


def markdown(result: dict[str, Any]) -> str:
    v = result["variants"]
    ssh = v.get("ssh", {}).get("mb_s")
    rows = [[LABELS.get(name, name), fmt(row["mb_s"], 1),
             f"{fmt(row['min'], 1)}–{fmt(row['max'], 1)}",
             f"{row['mb_s'] / ssh:.2f}×" if ssh else "–"] for name, row in v.items()]
    lines = [f"### Stdin throughput: {fmt(result['mb'])} MB into `wc -c`, median of "
             f"{result['reps']} (interleaved)", "",
             md_table(["path", "MB/s", "range", "÷ ssh"], rows), ""]
    for name in ("amqtt", "mosquitto"):
        if name in v:
            ok = v[name]["mb_s"] >= TARGET_MB_S
            lines.append(f"Target stdin ≥ {TARGET_MB_S:g} MB/s ({name}): "
                         f"{'met' if ok else 'missed'} ({fmt(v[name]['mb_s'], 1)} MB/s).")
    return "\n".join(lines) + "\n"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=float, help="size of the file (default 100, quick 20)")
    parser.add_argument("--reps", type=int, help="transfers per variant (default 3)")


def main(argv: list[str] | None = None) -> int:
    return cli("stdin_throughput", (__doc__ or "").split("\n\n")[0], run, markdown, add_args,
               argv)


if __name__ == "__main__":
    raise SystemExit(main())
