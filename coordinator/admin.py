"""Administration over the bus: what ``xcloud admin`` asks when it has no ``--db``.

Only principals whose role is ``admin`` are served; everyone else gets ``forbidden``
(the request guard checks it, ``broker.request_roles``). The rules themselves live in
coordinator/bootstrap.py, shared with the direct-database path. A revoke or a rotation
makes the coordinator forget the principal's cached role at once (its next request is
refused) and asks the embedded broker (``broker.recheck``) to cut the principal's live
sessions. Replies never outgrow the bus: the principal list
is paginated within ``bus.max_payload`` and a Mosquitto export that would not fit is
refused with ``too_large``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.bus import Bus, BusError, Incoming, Lane
from coordinator import bootstrap
from coordinator.handling import Refusal, guarded
from schemas.codec import encode, envelope
from schemas.errors import WireError
from schemas.messages import (
    Body,
    BrokerRecheck,
    MosquittoExport,
    MosquittoExportReply,
    Ok,
    PrincipalsAdd,
    PrincipalsList,
    PrincipalsListReply,
    PrincipalsRevoke,
    PrincipalsRotate,
    PrincipalsToken,
)
from schemas.topics import Topics

if TYPE_CHECKING:
    from coordinator.store import PrincipalRecord, Store

log = logging.getLogger(__name__)

#: Page size of principals.list when the request names none, and the most it may ask.
DEFAULT_PAGE = 100
MAX_PAGE = 500  # schemas/json/principals.list.json
#: Room kept in a reply for the envelope (type, v, id, ts, re) around the rows.
ENVELOPE_ROOM = 512


def _row(p: PrincipalRecord) -> dict[str, Any]:
    return {"id": p.id, "role": p.role, "created_at": max(0.0, p.created_at),
            "revoked_at": p.revoked_at, "note": p.note[:bootstrap.NOTE_MAX]}


class AdminHandlers:
    """The admin requests of docs/protocol.md ("Administration"), on ``Lane.ADMIN``."""

    def __init__(self, bus: Bus, store: Store, topics: Topics, *, own_principal: str,
                 max_payload: int,
                 principal_changed: Callable[[str], None] | None = None,
                 principal_revoked: Callable[[str], None] | None = None) -> None:
        self.bus = bus
        self.store = store
        self.topics = topics
        self.own_principal = own_principal
        self.max_payload = max_payload
        self.principal_changed = principal_changed
        # Ends what the revoked principal holds: on Mosquitto its connection stays up until
        # the next export, and a grant it holds would stay good until its lease ran out.
        self.principal_revoked = principal_revoked

    def register(self) -> None:
        table: dict[str, Callable[[Incoming], Body]] = {
            PrincipalsAdd.TYPE: self.principals_add,
            PrincipalsRotate.TYPE: self.principals_rotate,
            PrincipalsRevoke.TYPE: self.principals_revoke,
            PrincipalsList.TYPE: self.principals_list,
            MosquittoExport.TYPE: self.mosquitto_export,
        }
        for mtype, fn in table.items():
            self.bus.on_inbox(mtype, guarded(self.bus, fn), lane=Lane.ADMIN)

    def _not_ourselves(self, principal: str, what: str) -> None:
        if principal == self.own_principal:
            raise Refusal("conflict", f"the coordinator will not {what} its own principal "
                          f"{principal!r} (it would cut itself off); stop it and use "
                          "`xcloud admin --db URL` instead")

    def _recheck(self, principal: str) -> None:
        """Forget ``principal``'s cached role, and ask the embedded broker to
        re-authenticate its live sessions now."""
        if self.principal_changed is not None:
            self.principal_changed(principal)
        try:
            self.bus.publish(self.topics.broker_recheck, BrokerRecheck(principals=[principal]))
        except (BusError, WireError, ValueError) as err:
            log.warning("could not ask the broker to recheck %s: %s", principal, err)

    # -- handlers ---------------------------------------------------------------------

    def principals_add(self, incoming: Incoming) -> Body:
        req: PrincipalsAdd = incoming.body
        if req.replace:
            self._not_ourselves(req.principal, "replace")
        token = bootstrap.issue_token(self.store, req.principal, req.role, req.note or "",
                                      replace=bool(req.replace))
        log.info("%s added principal %s (%s)", incoming.sender, req.principal, req.role)
        if req.replace:
            self._recheck(req.principal)
        elif self.principal_changed is not None:
            self.principal_changed(req.principal)
        return PrincipalsToken(principal=req.principal, role=req.role, token=token)

    def principals_rotate(self, incoming: Incoming) -> Body:
        req: PrincipalsRotate = incoming.body
        self._not_ourselves(req.principal, "rotate")
        token, record = bootstrap.rotate_token(self.store, req.principal)
        log.info("%s rotated the token of principal %s", incoming.sender, req.principal)
        self._recheck(req.principal)
        return PrincipalsToken(principal=req.principal, role=record.role, token=token)

    def principals_revoke(self, incoming: Incoming) -> Body:
        req: PrincipalsRevoke = incoming.body
        self._not_ourselves(req.principal, "revoke")
        bootstrap.revoke(self.store, req.principal)
        log.info("%s revoked principal %s", incoming.sender, req.principal)
        self._recheck(req.principal)
        if self.principal_revoked is not None:
            self.principal_revoked(req.principal)
        return Ok(detail={"principal": req.principal, "revoked": True})

    def principals_list(self, incoming: Incoming) -> PrincipalsListReply:
        req: PrincipalsList = incoming.body
        limit = min(req.limit or DEFAULT_PAGE, MAX_PAGE)
        records = bootstrap.list_principals(self.store, bool(req.include_revoked))
        if req.after is not None:
            records = [p for p in records if p.id > req.after]
        budget = self.max_payload - ENVELOPE_ROOM
        rows: list[dict[str, Any]] = []
        for record in records:
            if len(rows) == limit:
                break
            row = _row(record)
            # The codec writes JSON the same way: compact, non-ASCII escaped.
            budget -= len(json.dumps(row, separators=(",", ":"))) + 1
            if budget < 0:
                break
            rows.append(row)
        if records and not rows:
            raise Refusal("too_large", f"principal {records[0].id!r} alone does not fit in "
                          f"a message of bus.max_payload ({self.max_payload} bytes)")
        more = len(rows) < len(records)
        return PrincipalsListReply(principals=rows, cursor=rows[-1]["id"] if more else None)

    def mosquitto_export(self, incoming: Incoming) -> MosquittoExportReply:
        files = bootstrap.mosquitto_files(self.store, self.topics.root)
        reply = MosquittoExportReply(root=self.topics.root, principals=files.principals,
                                     passwd=files.passwd, acl=files.acl)
        too_large = Refusal(
            "too_large", f"the Mosquitto files of {files.principals} principals "
            f"({len(files.passwd) + len(files.acl)} characters) do not fit in one message "
            f"(bus.max_payload {self.max_payload} bytes); export them with `xcloud admin "
            "mosquitto-export DIR --db URL` where the database is reachable")
        try:
            size = len(encode(envelope(reply, re="x" * 64)))
        except WireError:  # over the schema's bound for the texts
            raise too_large from None
        if size > self.max_payload:
            raise too_large
        log.info("%s exported the Mosquitto files (%d principals)", incoming.sender,
                 files.principals)
        return reply
