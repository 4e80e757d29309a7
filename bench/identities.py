"""The principals a benchmark connects as (an id, a role and the plain token), and the
forms brokers check them in: ``{id: (role, $7$ hash)}`` and an ``EmbeddedBroker``
authenticator over it.

A benchmark that runs a coordinator must also register its principals in the
coordinator's database (``registered``): the coordinator admits a request only from a
live principal of its store (``coordinator.handling.RequestGuard``), whatever the broker
let connect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from broker.acl import Principal, Role
from broker.credentials import hash_token, new_token, verify_token


@dataclass(frozen=True)
class Identity:
    """A principal the benchmark connects as, with its plain token."""

    id: str
    role: str
    token: str = field(repr=False, default_factory=new_token)

    @property
    def principal(self) -> Principal:
        return Principal(self.id, Role(self.role))


def identities(*pairs: tuple[str, str]) -> dict[str, Identity]:
    """``{"alice": Identity("alice", "client", <token>)}`` from ``("alice", "client")``."""
    return {pid: Identity(pid, role) for pid, role in pairs}


def registered(db_url: str, root: str, *pairs: tuple[str, str],
               note: str = "bench") -> dict[str, Identity]:
    """Register each ``(id, role)`` in the coordinator's database at ``db_url`` (created
    and migrated if new) as ``xcloud admin principal add ID --role ROLE --db URL`` does
    (``coordinator.bootstrap.DirectAdmin``), and return them with the tokens issued
    there. Call it before the coordinator starts, as an operator bootstraps a grid."""
    from coordinator.bootstrap import DirectAdmin

    out: dict[str, Identity] = {}
    with DirectAdmin.open(db_url, root) as admin:
        for pid, role in pairs:
            out[pid] = Identity(pid, role, admin.add_principal(pid, role, note))
    return out


def credentials(ids: dict[str, Identity]) -> dict[str, tuple[str, str]]:
    return {i.id: (i.role, hash_token(i.token)) for i in ids.values()}


def dict_authenticator(creds: dict[str, tuple[str, str]]) -> Callable[[str, str],
                                                                       Principal | None]:
    """An ``EmbeddedBroker`` authenticator over ``{user: (role, $7$ hash)}``."""

    def authenticate(user: str, token: str) -> Principal | None:
        entry = creds.get(user)
        if entry is None or not verify_token(token, entry[1]):
            return None
        return Principal(user, Role(entry[0]))

    return authenticate
