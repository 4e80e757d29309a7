"""Which roles may send which request, and which requests are rate-limited.

The topic ACL (``broker.acl``) decides where a principal may publish; this table decides
what it may ask once there. Each inbox that serves requests has one table, checked in one
place before any handler runs: the coordinator's request guard
(``coordinator.handling.RequestGuard``) and the worker's
(``worker.request_guard.WorkerRequestGuard``). A type missing from the table is refused
for everyone (fail closed), so adding a request type means adding its row here; the
tests walk every cell (tests/test_authorization.py). docs/security.md prints the tables.

The worker cannot tell an admin from a client (it has no principal store): it knows the
coordinator by its configured principal id and takes everyone else for a client, and
the broker's ACL keeps other workers out of its inbox. So in ``WORKER_INBOX`` a rule
names either both ``admin`` and ``client`` or neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from broker.acl import Role


class Limit(StrEnum):
    """Which token bucket a request draws from (its sender's, per principal)."""

    NONE = "none"  # control traffic or trivially cheap: never refused for its rate
    REQUESTS = "requests"  # triggers work (a query, a process, a write): the request bucket
    REPORTS = "reports"  # exec.report: the worker's report bucket (bursts after an outage)


@dataclass(frozen=True)
class RequestRule:
    roles: frozenset[Role]
    limit: Limit = Limit.REQUESTS

    def allows(self, role: Role | None) -> bool:
        return role is not None and role in self.roles


ANYONE = frozenset(Role)
PEOPLE = frozenset({Role.ADMIN, Role.CLIENT})
ADMINS = frozenset({Role.ADMIN})
WORKERS = frozenset({Role.WORKER})
COORDINATOR = frozenset({Role.COORDINATOR})

COORDINATOR_INBOX: Mapping[str, RequestRule] = MappingProxyType({
    "ping": RequestRule(ANYONE, Limit.NONE),
    "workers.list": RequestRule(PEOPLE),
    "workers.show": RequestRule(PEOPLE),
    "workers.drain": RequestRule(ADMINS),
    "reserve": RequestRule(PEOPLE),
    "renew": RequestRule(PEOPLE),
    "release": RequestRule(PEOPLE),
    "reservations.list": RequestRule(PEOPLE),
    "client.hello": RequestRule(PEOPLE),
    "client.gone": RequestRule(PEOPLE),
    "client.accepts": RequestRule(PEOPLE),
    "audit.list": RequestRule(PEOPLE),
    "exec.report": RequestRule(WORKERS, Limit.REPORTS),
    "principals.add": RequestRule(ADMINS),
    "principals.rotate": RequestRule(ADMINS),
    "principals.revoke": RequestRule(ADMINS),
    "principals.list": RequestRule(ADMINS),
    "mosquitto.export": RequestRule(ADMINS),
    "workers.forget": RequestRule(ADMINS),
    # Data objects (docs/data.md); the bytes themselves move with xfer.*.
    "data.list": RequestRule(PEOPLE),
    "data.show": RequestRule(PEOPLE),
    "data.rm": RequestRule(PEOPLE),
    "data.pin": RequestRule(PEOPLE),
    "data.share": RequestRule(PEOPLE),
    # Applications (docs/data.md, "Applications").
    "apps.add": RequestRule(PEOPLE),
    "apps.list": RequestRule(PEOPLE),
    "apps.show": RequestRule(PEOPLE),
    "apps.rm": RequestRule(PEOPLE),
    # Batch jobs (docs/jobs.md): owners' requests; workers' attempt reports.
    "jobs.submit": RequestRule(PEOPLE),
    "jobs.list": RequestRule(PEOPLE),
    "jobs.show": RequestRule(PEOPLE),
    "jobs.cancel": RequestRule(PEOPLE),
    "jobs.hold": RequestRule(PEOPLE),
    "jobs.release": RequestRule(PEOPLE),
    "jobs.why": RequestRule(PEOPLE),
    "jobs.summary": RequestRule(PEOPLE),
    "attempt.started": RequestRule(WORKERS, Limit.REPORTS),
    "attempt.report": RequestRule(WORKERS, Limit.REPORTS),
})
"""Requests into ``{root}/coord/inbox/{sender}``; the role is the sender's in the store."""

WORKER_INBOX: Mapping[str, RequestRule] = MappingProxyType({
    "ping": RequestRule(COORDINATOR | PEOPLE, Limit.NONE),
    "caps.refresh": RequestRule(COORDINATOR),
    "reservation.open": RequestRule(COORDINATOR, Limit.NONE),
    "reservation.close": RequestRule(COORDINATOR, Limit.NONE),
    "exec.start": RequestRule(PEOPLE),
    "exec.signal": RequestRule(PEOPLE),
    "exec.list": RequestRule(PEOPLE),
    "exec.logs": RequestRule(PEOPLE),
    # Flow-controlled by its window (8 pieces per command), so not rate-limited.
    "exec.stdin": RequestRule(PEOPLE, Limit.NONE),
    # A window being dragged: the client coalesces, so a burst stays small.
    "exec.resize": RequestRule(PEOPLE, Limit.NONE),
    "job.assign": RequestRule(COORDINATOR, Limit.NONE),
    "job.kill": RequestRule(COORDINATOR, Limit.NONE),
    # A job's owner follows its running attempt's output (the worker checks the owner);
    # the coordinator too, to relay it to the dashboard (coordinator/http/job_output.py).
    "job.follow": RequestRule(PEOPLE | COORDINATOR),
    # The holder places a data object of the coordinator's store in its reservation's
    # work directory (worker/workdir_fetch.py; the grant is checked as put/get's).
    "workdir.fetch": RequestRule(PEOPLE),
})
"""Requests into ``{root}/worker/{wid}/inbox/{sender}`` (exec.* also need a valid grant)."""

for _type, _rule in WORKER_INBOX.items():  # see the module docstring
    if (Role.ADMIN in _rule.roles) != (Role.CLIENT in _rule.roles):
        raise AssertionError(f"WORKER_INBOX[{_type!r}] must treat admins as clients")
