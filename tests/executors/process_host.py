"""A stand-in for a worker process, for tests that kill it: it runs a process executor in
containment mode MODE on STATE_DIR, opens session ``r1``, starts COMMAND there, prints
one JSON line (the command's first output line as ``pids``, and the reaper's pid), then
blocks until killed.

    python -m tests.executors.process_host MODE STATE_DIR COMMAND
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from tests.executors.harness import start
from worker.executors.base import SessionSpec
from worker.executors.process import ProcessExecutor


def main(argv: list[str]) -> int:
    mode, state, command = argv
    executor = ProcessExecutor(Path(state), cgroups=mode)
    session = executor.open_session(
        SessionSpec("r1", Path(state) / "sessions" / "r1" / "work", "alice"))
    _handle, out = start(executor, session, command)
    idle = threading.Event()
    while b"\n" not in out.of("stdout"):
        idle.wait(0.01)  # polling the command's output, not synchronising a test
    pids = [int(p) for p in out.text().split("\n", 1)[0].split()]
    print(json.dumps({"pids": pids, "reaper": executor.containment.reaper_pid,
                      "mode": executor.containment.mode}), flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
