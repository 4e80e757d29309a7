"""WorkerRequestGuard: who may ask a worker what, and how fast (the worker's one check).

Every request handler on a worker's inbox (the agent's ``ping`` and ``caps.refresh``, the
exec service's ``reservation.*`` and ``exec.*``) is wrapped by ``wrap``: before it runs,
the sender's role must be allowed by ``broker.request_roles.WORKER_INBOX`` (``forbidden``
otherwise) and, for requests that trigger work, the sender's token bucket
(``worker.rate_limit_per_s`` / ``worker.rate_limit_burst``) must not be empty
(``rate_limited`` otherwise). Refusals are cheap (no I/O but the error reply), so a
flood from one principal costs little and does not hold up the others' requests.

The worker has no principal store: the configured ``worker.coordinator_principal`` is
the coordinator, anyone else in the inbox is a client or an admin (the broker's ACL lets
no other worker publish there). ``exec.*`` requests are then checked against their grant
(worker/exec_auth.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.acl import Role
from broker.bus import Bus, Incoming
from broker.config import WorkerConfig
from broker.rate_limit import TokenBuckets
from broker.request_roles import WORKER_INBOX, Limit, RequestRule

log = logging.getLogger(__name__)

Handler = Callable[[Incoming], None]


class WorkerRequestGuard:
    """Admits the requests of one worker's inbox (see the module docstring)."""

    def __init__(self, bus: Bus, config: WorkerConfig, *,
                 table: Mapping[str, RequestRule] = WORKER_INBOX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.coordinator = config.coordinator_principal or "coordinator"
        self.table = table
        self.buckets = TokenBuckets(config.rate_limit_per_s, config.rate_limit_burst,
                                    clock=clock)

    def role_of(self, sender: str) -> Role:
        return Role.COORDINATOR if sender == self.coordinator else Role.CLIENT

    def refusal(self, incoming: Incoming) -> tuple[str, str, dict[str, Any] | None] | None:
        """Why ``incoming`` may not be served now, as (code, message, detail); None when it
        may (it has then taken its token)."""
        sender = incoming.sender or ""
        mtype = incoming.message.type
        rule = self.table.get(mtype)
        if rule is None:
            return "forbidden", f"no principal may send {mtype} to a worker", None
        role = self.role_of(sender)
        if not sender or not rule.allows(role):
            if rule.roles == {Role.COORDINATOR}:
                return ("forbidden", f"only the coordinator may send {mtype}",
                        {"reason": "not_coordinator"})
            may = " or ".join(sorted(r.value for r in rule.roles))
            return ("forbidden", f"{sender} ({role.value}) may not send {mtype}; it is for "
                    f"{may} principals", {"reason": "role"})
        if rule.limit is Limit.NONE:
            return None
        wait = self.buckets.take(sender)
        if wait > 0:
            return ("rate_limited",
                    f"{sender} sends requests too fast: at most {self.buckets.rate:g} per "
                    f"second (bursts of {self.buckets.burst}); {mtype} refused, retry in "
                    f"{wait:.2g}s", {"retry_after_s": round(wait, 3)})
        return None

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind this guard: refused requests get their error reply only."""

        def run(incoming: Incoming) -> None:
            refused = self.refusal(incoming)
            if refused is None:
                handler(incoming)
                return
            code, message, detail = refused
            log.debug("refused %s from %s: %s", incoming.message.type, incoming.sender,
                      message)
            self.bus.reply_error(incoming, code, message, detail)

        return run
