"""The principals a benchmark connects as (an id, a role and the plain token), and the
forms brokers check them in: ``{id: (role, $7$ hash)}`` and an ``EmbeddedBroker``
authenticator over it.
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
