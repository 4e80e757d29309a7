"""Administration that works on the coordinator's database directly.

Like ``mosquitto_passwd``, these commands run where the database is reachable (the
coordinator's machine, or anywhere with the MySQL URL). Tokens are shown once and only
their hashes are stored.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker.acl import Principal, Role
from broker.credentials import hash_token, new_token
from client.errors import ClientError
from client.table import render
from coordinator.store import Store
from schemas.topics import valid_principal_id


def issue_token(store: Store, principal_id: str, role: str, note: str = "",
                *, replace: bool = False) -> str:
    """Create ``principal_id`` with a fresh token and return the token.

    With ``replace`` an existing principal gets a new token (the old one stops working).
    """
    if not valid_principal_id(principal_id):
        raise ClientError(f"invalid principal id {principal_id!r}: use 1-128 characters "
                          "without / + # or NUL")
    try:
        Role(role)
    except ValueError:
        raise ClientError(f"unknown role {role!r}; choose one of "
                          f"{', '.join(r.value for r in Role)}") from None
    existing = store.get_principal(principal_id)
    if existing is not None and not existing.revoked:
        if not replace:
            raise ClientError(f"principal {principal_id!r} already exists; revoke it first "
                              "or use --rotate to issue a new token")
        store.revoke_principal(principal_id)
    token = new_token()
    store.add_principal(principal_id, role, hash_token(token), note)
    return token


def principals_table(store: Store, include_revoked: bool) -> str:
    rows = []
    for p in store.list_principals(include_revoked=include_revoked):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created_at))
        revoked = (time.strftime("%Y-%m-%d %H:%M", time.localtime(p.revoked_at))
                   if p.revoked_at else "-")
        rows.append([p.id, p.role, created, revoked, p.note or "-"])
    if not rows:
        return "no principals"
    return render(["ID", "ROLE", "CREATED", "REVOKED", "NOTE"], rows)


def revoke(store: Store, principal_id: str) -> None:
    if not store.revoke_principal(principal_id):
        raise ClientError(f"no active principal {principal_id!r}")


def export_mosquitto(store: Store, root: str, directory: Path) -> tuple[Path, Path]:
    """Write a Mosquitto password file and ACL file equivalent to our broker's rules."""
    from broker.mosquitto import write_mosquitto_files

    entries = []
    for p in store.list_principals():
        try:
            entries.append((Principal(id=p.id, role=Role(p.role)), p.token_hash))
        except ValueError:
            continue
    directory.mkdir(parents=True, exist_ok=True)
    return write_mosquitto_files(entries, root, directory)
