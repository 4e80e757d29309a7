"""Topic authorization: who may publish and subscribe where.

Pure and fast (no I/O), shared by the embedded broker's topic plugin and by the Mosquitto
export, so both enforce one rule set. The key rule is the *sender suffix*: every inbox
topic ends in the sender's principal id (``{root}/coord/inbox/{sender}``) and a principal
may publish into an inbox only under its own id. MQTT 3.1.1 carries no authenticated
sender in a PUBLISH, so the topic carries it and this ACL makes it trustworthy.

Subscriptions are granted only when the requested filter is *covered* by an allowed one
(every topic the request can match is matched by an allowed filter), so wildcard
escalation such as ``xcloud/#`` or ``xcloud/client/+/inbox/+`` is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from schemas.topics import DEFAULT_ROOT, Topics, valid_principal_id

log = logging.getLogger(__name__)

_MAX_TOPIC_LEN = 65535  # MQTT string limit; longer cannot arrive on the wire anyway
_RULE_CACHE_MAX = 4096


class Role(StrEnum):
    """What kind of principal an MQTT user is; decides its topic rights."""

    ADMIN = "admin"
    CLIENT = "client"
    WORKER = "worker"
    COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Principal:
    """An authenticated identity: ``id`` is the MQTT username and a topic segment.

    Construction refuses ids that cannot be a single topic level (``/ + #``, NUL, empty,
    over 128 chars): such an id would let its owner publish outside its own inbox slot.
    ``role`` may be given as its string value (handy for rows from a database).
    """

    id: str
    role: Role

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not valid_principal_id(self.id):
            raise ValueError(
                f"invalid principal id {self.id!r}: must be 1-128 chars without / + # or NUL"
            )
        if not isinstance(self.role, Role):
            object.__setattr__(self, "role", Role(self.role))


def _valid_topic(topic: str) -> bool:
    return bool(topic) and len(topic) <= _MAX_TOPIC_LEN and "\0" not in topic


def valid_topic_name(topic: str) -> bool:
    """True for a concrete topic a client may publish to (no wildcards)."""
    return _valid_topic(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """True for a syntactically valid MQTT 3.1.1 subscription filter."""
    if not _valid_topic(topic_filter):
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when the concrete ``topic`` matches ``topic_filter`` (MQTT 3.1.1 rules)."""
    return _matches(topic_filter.split("/"), topic.split("/"), topic)


def _matches(flevels: list[str], tlevels: list[str], topic: str) -> bool:
    # [MQTT-4.7.2-1] filters starting with a wildcard never match $-topics.
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False
    n = len(tlevels)
    for i, level in enumerate(flevels):
        if level == "#":
            return True  # also matches the parent level ("a/#" matches "a")
        if i >= n:
            return False
        if level != "+" and level != tlevels[i]:
            return False
    return len(flevels) == n


def filter_covers(allowed: str, requested: str) -> bool:
    """True when every topic matching filter ``requested`` also matches filter ``allowed``.

    Level by level: an allowed ``#`` covers anything from there on (including the parent
    level a requested ``#`` implies); an allowed ``+`` covers any single level (literal or
    ``+``) but not a requested ``#``; a literal covers only the same literal.
    """
    return _covers(allowed.split("/"), requested.split("/"), requested)


def _covers(alevels: list[str], rlevels: list[str], requested: str) -> bool:
    if alevels[0] in ("+", "#") and requested.startswith("$"):
        return False
    n = len(rlevels)
    for i, level in enumerate(alevels):
        if level == "#":
            return True
        if i >= n:
            return False
        req = rlevels[i]
        if req == "#":
            return False  # allowed is narrower at this level (no '#')
        if level == "+":
            continue
        if req != level:  # a requested '+' is wider than a literal
            return False
    return len(alevels) == n


@dataclass(frozen=True)
class Rules:
    """A principal's allowed filters, pre-split for fast matching."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_levels: tuple[list[str], ...]
    subscribe_levels: tuple[list[str], ...]

    @classmethod
    def of(cls, publish: list[str], subscribe: list[str]) -> Rules:
        return cls(
            tuple(publish),
            tuple(subscribe),
            tuple(p.split("/") for p in publish),
            tuple(s.split("/") for s in subscribe),
        )


_NO_RULES = Rules.of([], [])


class Acl:
    """The xcloud topic ACL for one grid root.

    Rules (``R`` = root): the coordinator may do anything under ``R/#``; a worker ``W``
    publishes its own status/caps/heartbeat and into the coordinator's, clients' and
    workers' inboxes under its own id, and reads its own inbox and the coordinator's
    status and public key; a client or admin ``C`` publishes into the coordinator's and
    workers' inboxes under its own id and reads its own inbox, worker status/caps,
    coordinator status/pubkey and events (an admin also reads heartbeats and every
    job's events on ``R/events/jobs``, and may ask the broker to re-check principals on
    ``R/broker/recheck``, as the coordinator may).
    File transfer segments (docs/transfer.md) follow the inbox rule: a principal
    publishes them under its own id only, ``R/coord/xfer/{id}/#`` and, like its inbox
    rights, ``R/client/+/xfer/{W}/#`` (worker) or ``R/worker/+/xfer/{C}/#`` (client),
    and subscribes only to its own ``R/worker/{W}/xfer/#`` or ``R/client/{C}/xfer/#``.
    Everything else, including any ``$``-topic for non-coordinators, is denied.
    """

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        if (
            not root
            or root.startswith("$")
            or not valid_topic_name(root)
            or any(not level for level in root.split("/"))
        ):
            raise ValueError(f"invalid topic root {root!r}")
        self.root = root
        self._cache: dict[Principal, Rules] = {}
        self._retainable = tuple(
            f.split("/")
            for f in (
                f"{root}/worker/+/status",
                f"{root}/worker/+/caps",
                f"{root}/coord/status",
                f"{root}/coord/pubkey",
            )
        )

    def rules(self, principal: Principal) -> tuple[list[str], list[str]]:
        """(publish filters, subscribe filters) allowed to ``principal``."""
        r = self._rules(principal)
        return list(r.publish), list(r.subscribe)

    def _rules(self, principal: Principal) -> Rules:
        cached = self._cache.get(principal)
        if cached is not None:
            return cached
        rules = self._build(principal)
        if len(self._cache) >= _RULE_CACHE_MAX:
            self._cache.clear()  # crude bound; rebuilding is cheap
        self._cache[principal] = rules
        return rules

    def _build(self, principal: Principal) -> Rules:
        pid = principal.id
        if not isinstance(pid, str) or not valid_principal_id(pid):
            # Principal() refuses these; guard anyway against objects built around it.
            log.warning("refusing all rights to principal with invalid id %r", pid)
            return _NO_RULES
        r = self.root
        role = principal.role
        if role == Role.COORDINATOR:
            return Rules.of([f"{r}/#"], [f"{r}/#", "$SYS/#"])
        if role == Role.WORKER:
            return Rules.of(
                [
                    f"{r}/worker/{pid}/status",
                    f"{r}/worker/{pid}/caps",
                    f"{r}/worker/{pid}/heartbeat",
                    f"{r}/coord/inbox/{pid}",
                    f"{r}/client/+/inbox/{pid}",
                    f"{r}/coord/xfer/{pid}/#",
                    f"{r}/client/+/xfer/{pid}/#",
                ],
                [f"{r}/worker/{pid}/inbox/+", f"{r}/coord/status", f"{r}/coord/pubkey",
                 f"{r}/worker/{pid}/xfer/#"],
            )
        if role in (Role.CLIENT, Role.ADMIN):
            subscribe = [
                f"{r}/client/{pid}/inbox/+",
                f"{r}/worker/+/status",
                f"{r}/worker/+/caps",
                f"{r}/coord/status",
                f"{r}/coord/pubkey",
                f"{r}/event/#",
                f"{r}/client/{pid}/xfer/#",
            ]
            publish = [f"{r}/coord/inbox/{pid}", f"{r}/worker/+/inbox/{pid}",
                       f"{r}/coord/xfer/{pid}/#", f"{r}/worker/+/xfer/{pid}/#"]
            if role == Role.ADMIN:
                subscribe.append(f"{r}/worker/+/heartbeat")
                # Every job's events (coordinator/scheduler.py announce): admins only.
                subscribe.append(Topics(r).admin_job_events)
                # Revocation must reach live connections (broker.revocation). The broker
                # re-checks against its own authenticator, so this right can only cut
                # principals that really are revoked.
                recheck = Topics(r).broker_recheck
                publish.append(recheck)
                subscribe.append(recheck)
            return Rules.of(publish, subscribe)
        return _NO_RULES

    def can_publish(self, principal: Principal, topic: str) -> bool:
        """True when ``principal`` may publish to the concrete ``topic``."""
        if not isinstance(topic, str) or not valid_topic_name(topic):
            return False
        tlevels = topic.split("/")
        return any(_matches(f, tlevels, topic) for f in self._rules(principal).publish_levels)

    def can_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """True when ``topic_filter`` is valid and covered by one of the allowed filters."""
        if not isinstance(topic_filter, str) or not valid_topic_filter(topic_filter):
            return False
        rlevels = topic_filter.split("/")
        return any(
            _covers(a, rlevels, topic_filter) for a in self._rules(principal).subscribe_levels
        )

    def can_retain(self, principal: Principal, topic: str) -> bool:
        """True when a retained publish by ``principal`` on ``topic`` may be stored.

        Only state topics are retained (worker status/caps, coordinator status/pubkey).
        A retained message in an inbox would be replayed to its owner at every
        subscribe, e.g. a stale request re-run by a restarted coordinator.
        """
        if not self.can_publish(principal, topic):
            return False
        tlevels = topic.split("/")
        return any(_matches(f, tlevels, topic) for f in self._retainable)

    def can_receive(self, principal: Principal, topic: str) -> bool:
        """True when a message on the concrete ``topic`` may be delivered to ``principal``.

        The delivery-time check (Mosquitto's "read"): a defence in depth behind
        ``can_subscribe`` for sessions whose subscriptions predate their current owner.
        """
        if not isinstance(topic, str) or not valid_topic_name(topic):
            return False
        tlevels = topic.split("/")
        return any(_matches(f, tlevels, topic) for f in self._rules(principal).subscribe_levels)
