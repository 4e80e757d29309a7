"""Who may do what on a worker's exec service.

- ``reservation.open`` / ``reservation.close`` only from the coordinator principal
  (``from_coordinator``);
- every ``exec.*`` under a grant that verifies with the coordinator's key, names this
  worker and the *sending* principal, is unexpired, and belongs to a session open here
  (``ExecAuthorizer``). Otherwise the answer is ``forbidden`` with ``detail.reason`` =
  why, and nothing runs (invariant 2).

The key (``CoordinatorKey``) is the configured ``worker.coord_pubkey``, or the first one
the coordinator publishes (retained) on ``{root}/coord/pubkey``, pinned in the state dir
so a later, different key is refused.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.bus import Bus, Incoming, Lane
from broker.config import WorkerConfig
from schemas.grants import (
    GrantClaims,
    GrantError,
    public_key_bytes,
    public_key_from_text,
    verify_grant,
)
from schemas.messages import CoordPubkey
from schemas.topics import Topics
from worker.errors import WorkerError

if TYPE_CHECKING:
    from worker.exec_commands import Command
    from worker.exec_sessions import Session

log = logging.getLogger(__name__)

PIN_FILE = "coord_pubkey"
VERIFIED_MAX = 256  # grants whose signature was checked, remembered per authorizer
EXPIRY_LEEWAY_S = 2.0  # verify_grant's default


def from_coordinator(bus: Bus, coordinator: str, incoming: Incoming) -> bool:
    """True for a request sent by the coordinator principal; else refused (forbidden)."""
    if incoming.sender == coordinator:
        return True
    log.warning("%s from %s refused: only %s may send it", incoming.message.type,
                incoming.sender, coordinator)
    bus.reply_error(incoming, "forbidden",
                    f"only the coordinator may send {incoming.message.type}",
                    detail={"reason": "not_coordinator"})
    return False


class CoordinatorKey:
    """The coordinator's grant-verification key: configured, or pinned on first sight."""

    def __init__(self, bus: Bus, topics: Topics, config: WorkerConfig,
                 state_dir: Path, lane: Lane) -> None:
        self.bus = bus
        self.topics = topics
        self.config = config
        self.pin_path = state_dir / PIN_FILE
        self.lane = lane
        self.ready = threading.Event()
        self._key: Ed25519PublicKey | None = None
        self._key_raw: bytes | None = None
        self._pin_broken = False
        self._lock = threading.Lock()

    @property
    def key(self) -> Ed25519PublicKey | None:
        return self._key

    def load(self) -> None:
        """Take the configured key, else the pinned one and listen for the published one.

        Raises WorkerError when ``coord_pubkey`` is configured but unusable.
        """
        if self.config.coord_pubkey:
            try:
                key = public_key_from_text(self.config.coord_pubkey.strip())
            except GrantError as err:
                raise WorkerError(f"worker.coord_pubkey is not usable: {err}") from err
            self._set(key)
            log.info("grants are checked with the configured coordinator key")
            return
        pin = self.pin_path
        if pin.exists():
            try:
                self._set(public_key_from_text(pin.read_text().strip()))
            except (OSError, GrantError) as err:
                self._pin_broken = True
                log.error("pinned coordinator key %s is unusable (%s): every grant is refused "
                          "until it is fixed or removed", pin, err)
        self.bus.subscribe(self.topics.coord_pubkey, self._on_pubkey, lane=self.lane)

    def _set(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._key_raw = public_key_bytes(key)
        self.ready.set()

    def _on_pubkey(self, incoming: Incoming) -> None:
        body = incoming.body
        if not isinstance(body, CoordPubkey):
            return
        if body.alg != "ed25519":
            log.error("coordinator key with unsupported algorithm %r ignored", body.alg)
            return
        try:
            key = public_key_from_text(body.key)
        except GrantError as err:
            log.error("coordinator key on %s ignored: %s", incoming.topic, err)
            return
        raw = public_key_bytes(key)
        with self._lock:
            if self._pin_broken:
                return
            if self._key_raw is None:
                self._pin(body.key)
                self._set(key)
                log.info("pinned the coordinator's grant key (kid %s)", body.kid or "?")
            elif raw != self._key_raw:
                log.error(
                    "the coordinator now publishes a different grant key (kid %s): refused, "
                    "grants are still checked with the pinned key. If the coordinator's key "
                    "really changed, remove %s and restart the worker.",
                    body.kid or "?", self.pin_path)

    def _pin(self, text: str) -> None:
        path = self.pin_path
        tmp = path.with_name(f".{PIN_FILE}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text.strip() + "\n")
            os.replace(tmp, path)
        except OSError as err:
            log.error("cannot pin the coordinator key in %s: %s", path, err)


class ExecAuthorizer:
    """The grant checks of every ``exec.*`` request (see the module docstring).

    ``find_session`` looks an open session up by reservation id.
    """

    def __init__(self, bus: Bus, wid: str, key: CoordinatorKey,
                 find_session: Callable[[str], Session | None]) -> None:
        self.bus = bus
        self.wid = wid
        self.key = key
        self.find_session = find_session
        # A grant's signature is checked once (ed25519 costs ~130 us, on every keystroke of
        # a terminal); expiry is checked at every use. Keyed by grant and sender; emptied
        # when the coordinator's key changes.
        self._verified: OrderedDict[tuple[str, str], GrantClaims] = OrderedDict()
        self._verified_key: Ed25519PublicKey | None = None
        self._verified_lock = threading.Lock()

    def _claims(self, key: Ed25519PublicKey, grant: str, sender: str) -> GrantClaims:
        """verify_grant, remembering what verified; GrantError as it raises."""
        with self._verified_lock:
            if self._verified_key is not key:
                self._verified.clear()
                self._verified_key = key
            claims = self._verified.get((grant, sender))
            if claims is not None:
                self._verified.move_to_end((grant, sender))
        if claims is None:
            claims = verify_grant(key, grant, client=sender, worker=self.wid)
            with self._verified_lock:
                if self._verified_key is key:
                    self._verified[(grant, sender)] = claims
                    while len(self._verified) > VERIFIED_MAX:
                        self._verified.popitem(last=False)
            return claims
        late = time.time() - claims.exp
        if late > EXPIRY_LEEWAY_S:
            with self._verified_lock:
                self._verified.pop((grant, sender), None)
            raise GrantError("expired", f"grant expired {late:.0f}s ago")
        return claims

    def authorize(self, incoming: Incoming, grant: str) -> tuple[GrantClaims, Session] | None:
        """The grant's claims and open session, or None after replying ``forbidden``."""

        def refuse(reason: str, message: str) -> None:
            log.warning("%s from %s refused (%s): %s", incoming.message.type,
                        incoming.sender, reason, message)
            self.bus.reply_error(incoming, "forbidden", message, detail={"reason": reason})

        sender = incoming.sender
        if not sender:
            refuse("no_sender", "the request did not come through an inbox")
            return None
        key = self.key.key
        if key is None:
            refuse("no_key", f"worker {self.wid} does not know the coordinator's key yet")
            return None
        try:
            claims = self._claims(key, grant, sender)
        except GrantError as err:
            refuse(err.code, f"grant refused: {err}")
            return None
        session = self.find_session(claims.rid)
        if session is None or session.closing:
            refuse("reservation_not_open",
                   f"reservation {claims.rid} is not open on worker {self.wid}")
            return None
        if session.record.client != claims.client:
            refuse("wrong_client", f"reservation {claims.rid} is not held by {claims.client}")
            return None
        return claims, session

    def authorized_exec(self, incoming: Incoming, grant: str, exec_id: str) -> Command | None:
        """The command a request names, if the grant holds; else the error is already sent."""
        auth = self.authorize(incoming, grant)
        if auth is None:
            return None
        command = auth[1].execs.get(exec_id)
        if command is None:
            self.bus.reply_error(incoming, "not_found",
                                 f"no exec {exec_id} in this reservation")
        return command
