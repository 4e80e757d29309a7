"""Child processes of a benchmark, and how it waits for them.

Every process started here is stopped by the code that started it and, as a backstop,
asks the kernel to SIGTERM it when its parent dies (``die_with_parent``). All traffic
stays on 127.0.0.1, on ports that were free a moment before (``free_port``). ``spawn``
starts one of this repo's commands (``python -m client.cli …``) with an environment free
of XCLOUD_* settings (``child_env``), its output in a log file that ``tail`` shows when
something fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")
LOCALHOST = "127.0.0.1"
SPAWN = mp.get_context("spawn")
PR_SET_PDEATHSIG = 1
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (returned) or raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("amqtt", "transitions", "websockets"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


def run_quiet(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
