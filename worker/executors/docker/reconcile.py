"""After a worker restart: match the handles the worker persisted with the containers the
engine still runs under its id, and remove what nobody claims.

- ``live_sessions``: the sessions whose containers still run (looked up by label, not
  by the id in the handle, which may be stale), with the commands the previous agent
  started there killed: their output streams died with it, so nobody could see or stop
  them. Handles this driver cannot read are never recovered.
- ``remove_orphans``: every container labelled with this worker's id whose session is
  not kept. Containers of other workers are never touched.
"""

from __future__ import annotations

import logging

from worker.executors.base import ExecutorError, SessionHandle
from worker.executors.docker.container import LABEL_SESSION, Containers
from worker.executors.docker.state import SessionState
from worker.executors.docker.wrapper import SIGNAL_ALL_SCRIPT

log = logging.getLogger(__name__)


def live_sessions(containers: Containers, handles: list[SessionHandle]
                  ) -> list[tuple[SessionHandle, SessionState]]:
    """(handle, state) of every session in ``handles`` whose container still runs; each
    handle's state is updated to name the running container."""
    alive: list[tuple[SessionHandle, SessionState]] = []
    for handle in handles:
        try:
            state = SessionState.of(handle)
        except ExecutorError as err:
            if handle.executor == "docker":
                log.warning("session %s: not recovered (%s)", handle.session_id, err)
            continue
        running = [s for s in containers.find(handle.session_id)
                   if s.get("State") == "running"]
        if not running:
            continue
        state.container_id = str(running[0]["Id"])
        handle.driver_state = state.dump()
        out = containers.run(state.container_id,
                             ["/bin/sh", "-c", SIGNAL_ALL_SCRIPT, "xcloud", "KILL"],
                             check=False).strip()
        if out not in ("", "0"):
            log.info("session %s: killed %s command(s) left by the previous agent",
                     handle.session_id, out)
        alive.append((handle, state))
    return alive


def remove_orphans(containers: Containers, keep: set[str]) -> list[str]:
    """Remove this worker's containers whose session is not in ``keep``; the session ids
    of those removed (one per container)."""
    removed: list[str] = []
    for summary in containers.find():
        session_id = (summary.get("Labels") or {}).get(LABEL_SESSION, "")
        if session_id in keep:
            continue
        containers.remove(str(summary["Id"]))
        removed.append(session_id)
        log.info("removed orphan container %s (session %s)", str(summary["Id"])[:12],
                 session_id or "?")
    return removed
