"""The worker caps glibc's malloc arenas (worker/main.py ``limit_malloc_arenas``): each
thread that allocates would otherwise get an arena of its own, a few MB of RSS each, the
margin of the idle worker's 50 MB budget (BENCHMARKS.md §4). Counted with glibc's own
``malloc_info`` in a fresh interpreter whose threads allocate at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import ctypes, re, sys, tempfile, threading
from worker.main import limit_malloc_arenas
if sys.argv[1] == "cap":
    assert limit_malloc_arenas(1)
libc = ctypes.CDLL(None)
start = threading.Barrier(4)
keep = []
def allocate():
    start.wait()
    keep.append([bytes(200) + bytes([i % 256]) for i in range(20000)])
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r") as out:
    fp = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(len(re.findall(r'<heap nr="\d+">', out.read())))
"""


def _arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_the_worker_process_keeps_to_the_arenas_it_asked_for() -> None:
    assert _arenas("cap") == 1
    assert _arenas("free") > 1  # the probe does make threads take arenas of their own
