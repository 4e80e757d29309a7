"""Memory stays flat in the file size: the receiving process's peak RSS after a 256 MiB
upload is hardly above its peak after a 64 MiB one (a non-timed check; bench/transfer.py
reports both sides' figures).

The receiver runs as a child process (tests/fixtures/transfer.py ``receive``) so its
high-water mark is its own; the sender is this test process.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from broker.transfer import TransferEndpoint, TransferSettings, file_sha256
from tests.fixtures.grid import REPO, GridHarness
from tests.fixtures.transfer import close_endpoint, endpoint, make_file, peer_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1 << 20
GROWTH_LIMIT = 32 * MIB  # memory that grew with the file would add ~192 MiB


def test_receiver_memory_is_flat_in_the_file_size(grid: GridHarness, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tests.fixtures.transfer", "receive", "--url", grid.url,
           "--root", grid.root, "--principal", "hub", "--file", str(tmp_path / "hub")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env=grid.subprocess_env(XCLOUD_BUS_TOKEN=grid.token(
                                "hub", "coordinator")))
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                events.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    alice: TransferEndpoint | None = None
    try:
        ready = events.get(timeout=30)
        assert ready["event"] == "ready"
        alice = endpoint(grid, "alice", "client", settings=TransferSettings())
        peaks = {}
        for mib in (64, 256):
            src = make_file(tmp_path / f"f{mib}.bin", mib * MIB)
            alice.upload(peer_of(grid, "hub", "coordinator"), src, purpose={"kind": "file"})
            done = events.get(timeout=120)
            assert done["event"] == "complete"
            assert done["name"] == src.name
            assert file_sha256(tmp_path / "hub" / "files" / src.name) == file_sha256(src)
            peaks[mib] = done["peak_rss"]
            src.unlink()
            (tmp_path / "hub" / "files" / src.name).unlink()
        growth = peaks[256] - peaks[64]
        print(f"\nreceiver peak RSS: ready {ready['peak_rss'] / MIB:.0f} MiB, after 64 MiB "
              f"{peaks[64] / MIB:.0f} MiB, after 256 MiB {peaks[256] / MIB:.0f} MiB")
        assert growth < GROWTH_LIMIT, f"peak RSS grew {growth / MIB:.0f} MiB with the file"
    finally:
        if alice is not None:
            close_endpoint(alice)
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
