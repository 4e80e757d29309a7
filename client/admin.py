"""Administration over the bus: ``xcloud admin`` without ``--db``.

Requests to the coordinator, which serves them only for principals whose role is
``admin`` (coordinator/admin.py). Tokens are shown once. With ``--db`` the CLI works on
the database directly instead (coordinator/bootstrap.py), for bootstrap.

    with Grid.connect() as grid:
        admin = Admin(grid)
        token = admin.add_principal("alice")
        for p in admin.principals():
            print(p.id, p.role)
"""

from __future__ import annotations

import grp
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from client.errors import ClientError
from client.table import render
from schemas.messages import (
    MosquittoExport,
    MosquittoExportReply,
    PrincipalsAdd,
    PrincipalsList,
    PrincipalsListReply,
    PrincipalsRevoke,
    PrincipalsRotate,
    PrincipalsToken,
)
from schemas.registry import resolved_schema
from schemas.topics import valid_principal_id

if TYPE_CHECKING:
    from client.api import Grid

PASSWD_NAME = "passwd"  # the names broker.mosquitto.write_mosquitto_files uses
ACL_NAME = "acl"
MOSQUITTO_GROUP = "mosquitto"  # Debian's mosquitto runs as user and group mosquitto


class PrincipalRow(Protocol):
    """What a principal listing shows (``PrincipalInfo``, or a store record with --db)."""

    @property
    def id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def created_at(self) -> float: ...

    @property
    def revoked_at(self) -> float | None: ...

    @property
    def note(self) -> str: ...


@dataclass(frozen=True)
class PrincipalInfo:
    """One principal as the coordinator lists it (never its token or hash)."""

    id: str
    role: str
    created_at: float
    revoked_at: float | None
    note: str

    @classmethod
    def from_wire(cls, row: dict[str, Any]) -> PrincipalInfo:
        return cls(id=row["id"], role=row["role"], created_at=row["created_at"],
                   revoked_at=row.get("revoked_at"), note=row.get("note", ""))


@dataclass(frozen=True)
class MosquittoExportFiles:
    """The Mosquitto files the coordinator rendered, before they are written."""

    root: str
    principals: int
    passwd: str
    acl: str

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``passwd`` and ``acl`` into ``directory`` (mode 0600: they hold hashes;
        :func:`share_with_mosquitto` then lets Mosquitto read them)."""
        directory.mkdir(parents=True, exist_ok=True)
        passwd, acl = directory / PASSWD_NAME, directory / ACL_NAME
        _write_private(passwd, self.passwd)
        _write_private(acl, self.acl)
        return passwd, acl


def _check_id(principal: str) -> str:
    """The coordinator refuses a bad id too; this says so in the user's words."""
    if not valid_principal_id(principal):
        raise ClientError(f"invalid principal id {principal!r}: use 1-128 characters "
                          "without / + # or NUL")
    return principal


def _check_add(principal: str, role: str, note: str) -> None:
    _check_id(principal)
    props = resolved_schema(PrincipalsAdd.TYPE)["properties"]
    roles = props["role"]["enum"]
    if role not in roles:
        raise ClientError(f"unknown role {role!r}; choose one of {', '.join(roles)}")
    note_max = props["note"]["maxLength"]
    if len(note) > note_max:
        raise ClientError(f"the note is {len(note)} characters long; at most {note_max}")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def share_with_mosquitto(passwd: Path, acl: Path, group: str = MOSQUITTO_GROUP
                         ) -> str | None:
    """Make the exported files readable by Mosquitto, which drops to its own user.

    Where the group exists (Debian's package creates it) both files become
    ``root:mosquitto`` 0640: Mosquitto reads them, nobody else does. Elsewhere the ACL
    (no secrets) becomes 0644 and the password file (token hashes) stays 0600; the
    returned note says what to do about it. None when nothing is left to do.
    """
    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    if gid is not None:
        try:
            for path in (passwd, acl):
                os.chown(path, -1, gid)
                os.chmod(path, 0o640)
            return None
        except PermissionError:
            pass  # neither root nor a member of the group: as if it did not exist
    os.chmod(acl, 0o644)
    where = (f"the group {group!r} exists but this user cannot give files to it"
             if gid is not None else f"there is no group {group!r} here")
    return (f"note: {where}; {acl} is now world-readable (0644, it holds no secret) and "
            f"{passwd} stays 0600 (it holds token hashes): let the user Mosquitto runs "
            f"as read it (e.g. `chown mosquitto {passwd}`), or Mosquitto cannot load it")


class Admin:
    """The admin requests, through a connected ``Grid`` whose principal is an admin.

    A refusal raises ``client.reservation.Refused`` (``code`` ``forbidden`` for a
    non-admin, ``not_found``, ``conflict``, ``invalid``, ``too_large``); what the
    coordinator would refuse as malformed raises ``ClientError`` before it is sent.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def add_principal(self, principal: str, role: str = "client", note: str = "",
                      *, replace: bool = False) -> str:
        """Create ``principal`` and return its token (shown this once). With ``replace``
        an existing one gets a new token and its live sessions are cut."""
        _check_add(principal, role, note)
        reply: PrincipalsToken = self.grid.call(PrincipalsAdd(
            principal=principal, role=role, note=note or None, replace=replace or None))
        return reply.token

    def rotate(self, principal: str) -> str:
        """A new token for ``principal``; the old one stops working, its sessions end."""
        reply: PrincipalsToken = self.grid.call(PrincipalsRotate(principal=_check_id(principal)))
        return reply.token

    def revoke(self, principal: str) -> None:
        """Revoke ``principal``: its token stops working and its live sessions end."""
        self.grid.call(PrincipalsRevoke(principal=_check_id(principal)))

    def principals(self, include_revoked: bool = False,
                   page_size: int | None = None) -> Iterator[PrincipalInfo]:
        """Every principal, ordered by id, fetched a page at a time."""
        after: str | None = None
        while True:
            reply: PrincipalsListReply = self.grid.call(PrincipalsList(
                include_revoked=include_revoked or None, after=after, limit=page_size))
            for row in reply.principals:
                yield PrincipalInfo.from_wire(row)
            if reply.cursor is None or not reply.principals:
                return
            after = reply.cursor

    def drain(self, worker: str, drain: bool = True) -> str:
        """Stop (or resume) giving ``worker`` new work; returns its new state."""
        return self.grid.drain(worker, drain)

    def mosquitto_export(self) -> MosquittoExportFiles:
        """Mosquitto's password and ACL files for the live principals (``.write(dir)``)."""
        reply: MosquittoExportReply = self.grid.call(MosquittoExport())
        return MosquittoExportFiles(reply.root, reply.principals, reply.passwd, reply.acl)

    def export_mosquitto(self, directory: Path) -> tuple[Path, Path]:
        """Fetch the Mosquitto files and write them into ``directory``; their paths."""
        return self.mosquitto_export().write(directory)


class PrincipalAdmin(Protocol):
    """What ``xcloud admin`` needs: ``Admin`` over the bus, or
    ``coordinator.bootstrap.DirectAdmin`` on the database (``--db``)."""

    def add_principal(self, principal: str, role: str = "client", note: str = "",
                      *, replace: bool = False) -> str: ...

    def rotate(self, principal: str) -> str: ...

    def revoke(self, principal: str) -> None: ...

    def principals(self, include_revoked: bool = False) -> Iterable[PrincipalRow]: ...

    def export_mosquitto(self, directory: Path) -> tuple[Path, Path]: ...


def principals_table(rows: Sequence[PrincipalRow]) -> str:
    lines = []
    for p in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created_at))
        revoked = (time.strftime("%Y-%m-%d %H:%M", time.localtime(p.revoked_at))
                   if p.revoked_at else "-")
        lines.append([p.id, p.role, created, revoked, p.note or "-"])
    if not lines:
        return "no principals"
    return render(["ID", "ROLE", "CREATED", "REVOKED", "NOTE"], lines)


def mosquitto_conf_hint(passwd: Path, acl: Path) -> str:
    return (f"wrote {passwd} and {acl}; in mosquitto.conf add:\n"
            f"  allow_anonymous false\n  password_file {passwd}\n  acl_file {acl}\n"
            "  set_tcp_nodelay true")
