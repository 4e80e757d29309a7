"""Run the embedded MQTT broker alone until SIGINT/SIGTERM (``xcloud broker``).

It authenticates against the principals in the coordinator's database (the only thing
it reads there), so a coordinator elsewhere can use it as its broker. ``xcloud up`` runs
it this way, in a process of its own, when ``broker.own_process`` is set (see
coordinator/broker_process.py).
"""

from __future__ import annotations

import logging
import signal
import threading

from broker.config import Config
from broker.embedded import BrokerSettings, EmbeddedBroker
from broker.parent_death import die_with_parent

log = logging.getLogger(__name__)


def broker_settings(config: Config) -> BrokerSettings:
    """The embedded broker's settings from the ``[broker]`` and ``[bus]`` sections."""
    return BrokerSettings(host=config.broker.host, port=config.broker.port,
                          ws_port=config.broker.ws_port or None, root=config.bus.root,
                          allow_anonymous=config.broker.allow_anonymous)


def wait_for_stop(stop: threading.Event) -> None:
    """Block until SIGINT/SIGTERM (or ``stop``): short waits, so no signal is missed."""
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def run_broker(config: Config, stop: threading.Event | None = None,
               parent_pid: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM or ``stop``; with ``parent_pid`` (``xcloud up`` runs the
    broker in a process of its own), also until that parent dies. Then it is SIGKILLed,
    as an in-process broker dies with its process: a graceful stop would keep the
    workers' own goodbyes (their SIGTERM comes at the same moment) waiting on a broker
    that is going away."""
    if parent_pid is not None and not die_with_parent(parent_pid, signal.SIGKILL):
        log.error("parent process %d is gone; not starting", parent_pid)
        return 1
    # The principals live in the coordinator's store: imported here, not at module
    # level, so that the broker package does not depend on the coordinator's.
    from coordinator.auth import store_authenticator
    from coordinator.store import Store

    store = Store.open(config.db_url)
    try:
        broker = EmbeddedBroker(broker_settings(config), store_authenticator(store))
        broker.start_in_thread()
        try:
            print(f"broker listening on {broker.url}"
                  + (f" and {broker.ws_url}" if broker.ws_url else ""), flush=True)
            wait_for_stop(stop or threading.Event())
        finally:
            broker.stop_in_thread()
    finally:
        store.close()
    return 0
