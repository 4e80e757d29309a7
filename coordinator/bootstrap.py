"""Principal administration on the coordinator's database itself.

Two callers share these rules: ``xcloud admin --db URL …`` for bootstrap, when no
coordinator runs yet (the first principals, a Mosquitto export before Mosquitto starts),
and the coordinator's admin request handlers (coordinator/admin.py), which are how
admins work once the grid runs. Tokens are returned once; only their hashes are stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.acl import Principal, Role
from broker.credentials import hash_token, new_token
from broker.mosquitto import render_acl, render_passwd, write_mosquitto_files
from coordinator.errors import AlreadyExists, InvalidArgument, NotFound
from schemas.topics import valid_principal_id

if TYPE_CHECKING:
    from coordinator.store import PrincipalRecord, Store

log = logging.getLogger(__name__)

#: Longest note a principal may carry (schemas/json/envelope.json#/definitions/principal_note).
NOTE_MAX = 1024


def check_principal_id(principal_id: str) -> str:
    if not valid_principal_id(principal_id):
        raise InvalidArgument(f"invalid principal id {principal_id!r}: use 1-128 characters "
                              "without / + # or NUL")
    return principal_id


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidArgument(f"unknown role {role!r}; choose one of "
                              f"{', '.join(r.value for r in Role)}") from None


def issue_token(store: Store, principal_id: str, role: str, note: str = "",
                *, replace: bool = False) -> str:
    """Create ``principal_id`` with a fresh token and return the token.

    With ``replace`` an existing principal gets a new token (the old one stops working).
    """
    check_principal_id(principal_id)
    check_role(role)
    if len(note) > NOTE_MAX:
        raise InvalidArgument(f"the note is {len(note)} characters long; at most {NOTE_MAX}")
    existing = store.get_principal(principal_id)
    if existing is not None and not existing.revoked:
        if not replace:
            raise AlreadyExists(f"principal {principal_id!r} already exists; revoke it first "
                                "or use --rotate to issue a new token")
        store.revoke_principal(principal_id)
    token = new_token()
    store.add_principal(principal_id, role, hash_token(token), note)
    log.info("issued a token for principal %s (%s)", principal_id, role)
    return token


def live_principal(store: Store, principal_id: str) -> PrincipalRecord:
    """The principal, which must exist and not be revoked."""
    record = store.get_principal(principal_id)
    if record is None or record.revoked:
        raise NotFound(f"no active principal {principal_id!r}")
    return record


def rotate_token(store: Store, principal_id: str) -> tuple[str, PrincipalRecord]:
    """A new token for a live principal (same role and note); the old token stops working."""
    record = live_principal(store, principal_id)
    token = issue_token(store, principal_id, record.role, record.note[:NOTE_MAX], replace=True)
    return token, record


def revoke(store: Store, principal_id: str) -> None:
    """Revoke a live principal; NotFound when it is unknown or already revoked."""
    if not store.revoke_principal(principal_id):
        raise NotFound(f"no active principal {principal_id!r}")


def list_principals(store: Store, include_revoked: bool = False) -> list[PrincipalRecord]:
    """Principals ordered by id (code point order, whatever the database's collation)."""
    return sorted(store.list_principals(include_revoked=include_revoked), key=lambda p: p.id)


@dataclass(frozen=True)
class MosquittoFiles:
    """Mosquitto's password file and ACL file for the live principals, as text."""

    passwd: str
    acl: str
    principals: int


def _exportable(store: Store) -> list[tuple[Principal, str]]:
    entries = []
    for p in list_principals(store):
        try:
            entries.append((Principal(id=p.id, role=Role(p.role)), p.token_hash))
        except ValueError:
            log.warning("principal %s has unknown role %r: not exported", p.id, p.role)
    return entries


def mosquitto_files(store: Store, root: str) -> MosquittoFiles:
    """The texts ``broker.mosquitto`` renders from the store's live principals."""
    entries = _exportable(store)
    try:
        return MosquittoFiles(render_passwd(entries), render_acl((p for p, _ in entries), root),
                              len(entries))
    except ValueError as err:  # an id with ':' or whitespace, or a foreign hash
        raise InvalidArgument(f"cannot export to Mosquitto: {err}") from None


def export_mosquitto(store: Store, root: str, directory: Path) -> tuple[Path, Path]:
    """Write Mosquitto's ``passwd`` and ``acl`` (mode 0600) into ``directory``."""
    try:
        return write_mosquitto_files(_exportable(store), root, directory)
    except ValueError as err:
        raise InvalidArgument(f"cannot export to Mosquitto: {err}") from None


class DirectAdmin:
    """``xcloud admin --db URL``: the admin commands on the database itself, for bootstrap
    (no coordinator needed). The same methods as ``client.admin.Admin``; a revoke here
    cannot cut live sessions (there is no coordinator to ask the broker)."""

    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root

    @classmethod
    def open(cls, url: str, root: str) -> DirectAdmin:
        from coordinator.store import Store

        return cls(Store.open(url), root)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> DirectAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_principal(self, principal: str, role: str = "client", note: str = "",
                      *, replace: bool = False) -> str:
        return issue_token(self.store, principal, role, note, replace=replace)

    def rotate(self, principal: str) -> str:
        return rotate_token(self.store, principal)[0]

    def revoke(self, principal: str) -> None:
        revoke(self.store, principal)

    def principals(self, include_revoked: bool = False) -> list[PrincipalRecord]:
        return list_principals(self.store, include_revoked)

    def export_mosquitto(self, directory: Path) -> tuple[Path, Path]:
        return export_mosquitto(self.store, self.root, directory)
