"""Run a worker agent in the foreground until SIGINT/SIGTERM (``xcloud worker``).

Logging is the entry point's business; this only runs the agent. Imports stay lean
(no docker SDK, prompt_toolkit or peewee) so an idle worker stays small.

Given ``parent_pid`` (``xcloud up`` passes ``--parent-pid``), the worker ties its life to
that parent itself: on Linux the kernel sends it SIGTERM when the parent dies
(PR_SET_PDEATHSIG), and it leaves at once if the parent is already gone. Doing this in
the worker, not in a ``preexec_fn`` of the parent, keeps the parent's fork safe while
its threads run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from broker import parent_death
from broker.config import Config
from worker.agent import WorkerAgent
from worker.errors import WorkerError

log = logging.getLogger(__name__)

WARN_EVERY_S = 10.0
POLL_S = 0.5


class ParentGone(WorkerError):
    """The process this worker was started to live with has already exited."""


def die_with_parent(parent_pid: int) -> None:
    """Ask for SIGTERM when the parent dies; raise ParentGone if it already has."""
    if not parent_death.die_with_parent(parent_pid):
        raise ParentGone(f"parent process {parent_pid} is gone; not starting")


def _refusal(agent: WorkerAgent) -> str | None:
    # The bus keeps the broker's last CONNACK refusal privately; it is the most useful
    # thing to tell a user whose worker cannot join (wrong token, unknown principal).
    value = getattr(agent.bus, "_last_refusal", None)
    return str(value) if value else None


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; True when the C library took it.

    glibc gives each thread that allocates an arena of its own (up to 8 per core), and
    each keeps a few touched megabytes: the worker's dozen threads cost ~5 MB of RSS that
    way, the margin of its 50 MB idle budget (BENCHMARKS.md §4; 53 -> 48 MB). Its threads
    mostly wait, so two arenas cost no contention worth measuring. Call it before the
    threads start (``xcloud worker`` does); elsewhere than glibc it does nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError) as err:
        log.debug("cannot cap malloc arenas: %s", err)
        return False


def run_worker(
    cfg: Config,
    *,
    executors: Sequence[str] | None = None,
    stop: threading.Event | None = None,
    parent_pid: int | None = None,
) -> int:
    """Run until a signal (or ``stop``) asks to leave; return the exit status (0).

    Raises IdentityError (and other WorkerErrors) to the caller, which prints them. An
    unreachable broker is not an error: the bus keeps retrying and a warning is logged
    every ~10 s until it answers. With ``parent_pid``: see the module docstring.
    """
    stop = stop or threading.Event()
    if parent_pid is not None:
        die_with_parent(parent_pid)
    agent = WorkerAgent(cfg, executors=executors)
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, leaving the grid", signal.Signals(signum).name)
        stop.set()
        for old_sig, old_handler in previous.items():  # a second signal acts as usual
            signal.signal(old_sig, old_handler)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
    try:
        agent.start(wait=False)
        try:
            waited = 0.0
            next_warning = WARN_EVERY_S
            # Short waits: Python runs signal handlers only between bytecodes of the main
            # thread, and a long blocking wait can miss a signal delivered elsewhere.
            while not stop.wait(POLL_S):
                if agent.connected:
                    waited, next_warning = 0.0, WARN_EVERY_S
                    continue
                waited += POLL_S
                if waited < next_warning:
                    continue
                next_warning += WARN_EVERY_S
                refusal = _refusal(agent)
                if refusal:
                    log.warning(
                        "broker %s refuses worker %s (%s); check its id and token. "
                        "Still retrying.", cfg.bus.url, agent.wid, refusal)
                else:
                    log.warning(
                        "no MQTT broker reachable at %s for %.0f s; still retrying "
                        "(is `xcloud up` or the broker running? check --broker)",
                        cfg.bus.url, waited)
        finally:
            agent.stop("shutdown")
    finally:
        for old_sig, old_handler in previous.items():
            signal.signal(old_sig, old_handler)
    return 0
