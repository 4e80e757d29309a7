"""Run the coordinator daemon until SIGINT/SIGTERM (``xcloud coordinator``).

With ``embed_broker`` the embedded MQTT broker runs in the same process (with the
``[broker]`` settings, ``allow_anonymous`` included) and the coordinator connects to it.
The database URL is only ever shown masked: it usually holds a password, and this
output ends up in container logs.
"""

from __future__ import annotations

import logging
import threading

from broker.config import Config, mask_url
from broker.main import broker_settings, wait_for_stop

log = logging.getLogger(__name__)


def run_coordinator(config: Config, *, embed_broker: bool = False,
                    stop: threading.Event | None = None) -> int:
    from broker.embedded import EmbeddedBroker
    from coordinator.auth import store_authenticator
    from coordinator.service import Coordinator
    from coordinator.store import Store

    store = Store.open(config.db_url)
    broker: EmbeddedBroker | None = None
    try:
        if embed_broker:
            broker = EmbeddedBroker(broker_settings(config), store_authenticator(store))
            broker.start_in_thread()
            config.bus.url = broker.url
        coordinator = Coordinator(config, store)
        coordinator.start(wait=False)
        try:
            print(f"coordinator running (broker {mask_url(config.bus.url)}, "
                  f"database {mask_url(config.db_url)})", flush=True)
            if coordinator.dashboard is not None:
                print(f"dashboard {coordinator.dashboard.url}", flush=True)
            wait_for_stop(stop or threading.Event())
        finally:
            coordinator.stop()
    finally:
        if broker is not None:
            broker.stop_in_thread()
        store.close()
    return 0
