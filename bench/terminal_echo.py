"""Keystroke echo round trip on a remote terminal: ``xcloud run -t`` beside ``ssh -tt``.

What a person feels when typing into ``xcloud attach``: one key pressed, until its
echo is on the screen. Each variant is a child process on a local pty that this
benchmark holds as the person's terminal (the child puts it in raw mode, as it would a
real one); the remote command is ``stty raw -echo; exec cat`` on a pty of the worker,
so each byte goes through a remote program and back, as a shell's line editor echoes
it. A sample: write one byte to the local pty's master, read until that byte comes
back. The variants take turns key by key (interleaved), so drift hits them all alike.

- ``xcloud run -t`` (the code path of ``xcloud attach``: client/terminal.py) against
  ``xcloud up --workers 1`` (embedded amqtt in its own process; process executor), and
  against Mosquitto with a separate coordinator and worker (``--only`` picks);
- ``ssh -tt`` over a ControlMaster to a private sshd on 127.0.0.1
  (bench/ssh_server.py's ``SshServer``), the same remote command.

    python -m bench.terminal_echo [--quick] [--keys N] [--only amqtt,mosquitto,ssh]

Target (issue 13): echo p50 no slower than ssh's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any

from bench.percentiles import latency_ms
from bench.processes import PY, REPO, child_env
from bench.report import cli, fmt, md_table
from bench.scratch import scratch_dir
from bench.ssh_server import SshServer
from bench.xcloud_grids import SplitGrid, UpGrid, XcloudGrid, wait_online

VARIANTS = ("amqtt", "mosquitto", "ssh")
REMOTE = "stty raw -echo; exec cat"
FULL_KEYS = 300
QUICK_KEYS = 60
WARMUP_KEYS = 10
KEY_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
# The child makes the pty its controlling terminal, then becomes the client.
_CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "os.execvp(sys.argv[1], sys.argv[1:])")


class PtyChild:
    """A client process whose terminal is a pty held here."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.master, self.slave = os.openpty()
        # Raw from the start: the client makes it so anyway, and a local echo before it
        # did would pass for the remote one.
        tty.setraw(self.slave)
        self.proc = subprocess.Popen([PY, "-c", _CTTY, *cmd], cwd=REPO, env=env,
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     start_new_session=True)
        self.seen = b""

    def key(self, byte: bytes, timeout: float = KEY_TIMEOUT_S) -> float:
        """Seconds from writing ``byte`` until it comes back."""
        t0 = time.perf_counter()
        os.write(self.master, byte)
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: no echo of {byte!r}; it showed "
                                   f"{self.seen[-400:]!r}")
            if select.select([self.master], [], [], left)[0]:
                data = os.read(self.master, 65536)
                self.seen = (self.seen + data)[-4096:]
                if byte in data:
                    return time.perf_counter() - t0

    def ready(self) -> None:
        """Keys until one comes back (the remote cat is running, raw)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                self.key(b"r", timeout=1.0)
                return
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.label} never echoed: {self.seen[-400:]!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.write(self.master, b"\x04")  # not an EOF to a raw cat: stop the client
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def xcloud_child(label: str, xgrid: XcloudGrid) -> PtyChild:
    from client.api import Grid

    with Grid.connect(xgrid.config) as grid:
        wait_online(grid)
    bus = xgrid.config.bus
    settings = {"XCLOUD_HOME": str(xgrid.config.home), "XCLOUD_BUS_URL": bus.url,
                "XCLOUD_BUS_ROOT": bus.root, "XCLOUD_BUS_PRINCIPAL": bus.principal,
                "XCLOUD_BUS_TOKEN": bus.token}
    env = child_env(XCLOUD_LOG_LEVEL="ERROR", TERM="xterm",
                    **{k: str(v) for k, v in settings.items() if v})
    return PtyChild(label, [PY, "-m", "client.cli", "run", "-t", "--lease", "300", "--",
                            REMOTE], env)


def run(quick: bool = False, keys: int | None = None,
        only: str = ",".join(VARIANTS)) -> dict[str, Any]:
    wanted = [v.strip() for v in only.split(",") if v.strip()]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(sorted(unknown))}")
    n = keys or (QUICK_KEYS if quick else FULL_KEYS)
    result: dict[str, Any] = {"keys": n, "remote": REMOTE, "results": {}, "labels": {}}
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch_dir("xcloud-echo-"))
        children: dict[str, PtyChild] = {}
        skipped: dict[str, str] = result.setdefault("skipped", {})

        def setup(name: str) -> PtyChild:
            if name == "amqtt":
                up = stack.enter_context(UpGrid(Path(workdir)))
                return xcloud_child("xcloud run -t, embedded amqtt (xcloud up)", up)
            if name == "mosquitto":
                split = stack.enter_context(SplitGrid(Path(workdir), "mosquitto"))
                return xcloud_child("xcloud run -t, Mosquitto", split)
            sshd = stack.enter_context(SshServer(Path(workdir)))
            args = sshd.client_args()
            return PtyChild("ssh -tt over a ControlMaster",
                            [args[0], "-tt", *args[1:], REMOTE], child_env(TERM="xterm"))

        for name in wanted:
            try:
                children[name] = setup(name)
            except (RuntimeError, OSError) as err:  # no sshd, no Mosquitto here
                skipped[name] = str(err).splitlines()[0]
        for child in children.values():
            stack.callback(child.close)
        for child in children.values():
            child.ready()
        samples: dict[str, list[float]] = {name: [] for name in children}
        letters = b"abcdefghijklmnopqrstuvwxyz"
        names = list(children)
        for i in range(WARMUP_KEYS + n):
            order = names if i % 2 == 0 else names[::-1]  # interleaved, alternating lead
            byte = letters[i % len(letters):i % len(letters) + 1]
            for name in order:
                took = children[name].key(byte)
                if i >= WARMUP_KEYS:
                    samples[name].append(took)
        for name, child in children.items():
            result["results"][name] = latency_ms(samples[name])
            result["labels"][name] = child.label
    return result


def markdown(result: dict[str, Any]) -> str:
    res = result["results"]
    ssh = res.get("ssh", {}).get("p50")
    rows = []
    for name, stats in res.items():
        vs = f"{stats['p50'] / ssh:.2f}×" if ssh and name != "ssh" else ""
        rows.append([result["labels"][name], fmt(stats["p50"], 2), fmt(stats["p90"], 2),
                     fmt(stats["p99"], 2), vs])
    for name, why in result.get("skipped", {}).items():
        rows.append([f"{name}: skipped ({why})", "–", "–", "–", ""])
    lines = [f"### Keystroke echo round trip ({result['keys']} keys each, interleaved; "
             f"remote `{result['remote']}` on a pty)\n",
             md_table(["variant", "p50 ms", "p90 ms", "p99 ms", "p50 vs ssh"], rows)]
    if ssh:
        for name in ("amqtt", "mosquitto"):
            if name in res:
                met = res[name]["p50"] <= ssh
                lines.append(f"\nTarget echo p50 ≤ ssh's ({name}): "
                             f"{'met' if met else 'missed'} "
                             f"({res[name]['p50']:.2f} ms against {ssh:.2f} ms).")
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys", type=int, default=None, help="keystrokes per variant")
    parser.add_argument("--only", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")


def main(argv: list[str] | None = None) -> int:
    return cli("terminal_echo", __doc__ or "", run, markdown, add_args,
               argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
