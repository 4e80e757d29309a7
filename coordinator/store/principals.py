"""Principals: who may connect (clients, workers, admins), known by a token hash."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from peewee import IntegrityError

from coordinator.errors import AlreadyExists, NotFound
from coordinator.models import HASH_MAX, ID_MAX, ROLE_MAX
from coordinator.store.engine import StoreBase, op
from coordinator.store.values import checked_text, now_or

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrincipalRecord:
    """A principal as stored; ``token_hash`` stays out of ``repr`` so it never reaches logs."""

    id: str
    role: str
    token_hash: str = field(repr=False)
    created_at: float
    revoked_at: float | None
    note: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _principal_record(row: Any) -> PrincipalRecord:
    return PrincipalRecord(
        id=row.id,
        role=row.role,
        token_hash=row.token_hash,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        note=row.note,
    )


class PrincipalStore(StoreBase):
    """Registering, listing, revoking principals and looking up their token hash."""

    @op
    def add_principal(
        self, id: str, role: str, token_hash: str, note: str = "", *, now: float | None = None
    ) -> PrincipalRecord:
        """Register a principal; a revoked one with the same id is replaced."""
        checked_text(id, "principal id", ID_MAX)
        checked_text(role, "role", ROLE_MAX)
        checked_text(token_hash, "token hash", HASH_MAX)
        record = PrincipalRecord(id, role, token_hash, now_or(now), None, note or "")
        fields = {
            "role": role,
            "token_hash": token_hash,
            "created_at": record.created_at,
            "revoked_at": None,
            "note": record.note,
        }
        Principal = self.models.Principal
        try:
            with self.db.atomic():
                row = self._for_update(Principal.select().where(Principal.id == id)).get_or_none()
                if row is None:
                    Principal.insert(id=id, **fields).execute()
                elif row.revoked_at is None:
                    raise AlreadyExists(f"principal {id!r} already exists")
                else:
                    Principal.update(**fields).where(Principal.id == id).execute()
        except IntegrityError:
            raise AlreadyExists(f"principal {id!r} already exists") from None
        return record

    @op
    def get_principal(self, id: str) -> PrincipalRecord | None:
        """The principal, revoked or not; None if unknown."""
        Principal = self.models.Principal
        row = Principal.get_or_none(Principal.id == id)
        return None if row is None else _principal_record(row)

    @op
    def list_principals(self, include_revoked: bool = False) -> list[PrincipalRecord]:
        """Principals ordered by id."""
        Principal = self.models.Principal
        query = Principal.select().order_by(Principal.id)
        if not include_revoked:
            query = query.where(Principal.revoked_at.is_null())
        return [_principal_record(row) for row in query]

    @op
    def revoke_principal(self, id: str, *, now: float | None = None) -> bool:
        """Revoke; True if it was live, False if already revoked. NotFound if unknown."""
        Principal = self.models.Principal
        with self.db.atomic():
            row = self._for_update(Principal.select().where(Principal.id == id)).get_or_none()
            if row is None:
                raise NotFound(f"no principal {id!r}")
            if row.revoked_at is not None:
                return False
            Principal.update(revoked_at=now_or(now)).where(Principal.id == id).execute()
        log.info("revoked principal %s", id)
        return True

    @op
    def principal_hash(self, id: str) -> tuple[str, str] | None:
        """``(role, token_hash)`` of a live principal, for authentication; None otherwise."""
        Principal = self.models.Principal
        row = (
            Principal.select(Principal.role, Principal.token_hash)
            .where((Principal.id == id) & Principal.revoked_at.is_null())
            .tuples()
            .first()
        )
        return None if row is None else (row[0], row[1])
