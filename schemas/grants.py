"""Grants: the coordinator's signed permission for one client to use one worker.

Format (compact, JSON only): ``base64url(claims JSON) "." base64url(Ed25519 signature)``
where claims = {"v": 1, "rid", "client", "worker", "iat", "exp", "kid"}. The worker
verifies the signature with the coordinator's public key (config or the retained
``{root}/coord/pubkey``), then that the grant names this worker, the sending client,
an open reservation, and has not expired. Anything else is refused with a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.errors import XcloudError

MAX_GRANT = 4096


class GrantError(XcloudError):
    """A grant that must not be honoured; ``code`` says why (stable, for tests and logs)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class GrantClaims:
    rid: str
    client: str
    worker: str
    iat: float
    exp: float
    kid: str


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key_bytes(public)).hexdigest()[:16]


def public_key_bytes(public: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_to_text(public: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key_bytes(public)).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as err:
        raise GrantError("bad_key", f"not an Ed25519 public key: {err}") from err


def sign_grant(private: Ed25519PrivateKey, *, rid: str, client: str, worker: str,
               exp: float, iat: float | None = None) -> str:
    claims = {"v": 1, "rid": rid, "client": client, "worker": worker,
              "iat": time.time() if iat is None else iat, "exp": exp,
              "kid": key_id(private.public_key())}
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return f"{_b64e(payload)}.{_b64e(private.sign(payload))}"


def verify_grant(public: Ed25519PublicKey, grant: str, *, client: str, worker: str,
                 now: float | None = None, leeway_s: float = 2.0) -> GrantClaims:
    """The claims of a grant valid for ``client`` on ``worker`` now; else GrantError."""
    if not isinstance(grant, str) or len(grant) > MAX_GRANT or grant.count(".") != 1:
        raise GrantError("malformed", "grant is not of the form claims.signature")
    payload_text, sig_text = grant.split(".")
    try:
        payload, signature = _b64d(payload_text), _b64d(sig_text)
    except (binascii.Error, ValueError) as err:
        raise GrantError("malformed", f"grant is not base64url: {err}") from err
    try:
        public.verify(signature, payload)
    except InvalidSignature:
        raise GrantError("bad_signature", "grant signature does not verify with the "
                         "coordinator's key") from None
    try:
        data = json.loads(payload)
        claims = GrantClaims(rid=str(data["rid"]), client=str(data["client"]),
                             worker=str(data["worker"]), iat=float(data["iat"]),
                             exp=float(data["exp"]), kid=str(data.get("kid", "")))
    except (ValueError, KeyError, TypeError) as err:
        raise GrantError("malformed", f"grant claims unreadable: {err}") from err
    if data.get("v") != 1:
        raise GrantError("malformed", f"unsupported grant version {data.get('v')!r}")
    if claims.worker != worker:
        raise GrantError("wrong_worker", f"grant is for worker {claims.worker}, not {worker}")
    if claims.client != client:
        raise GrantError("wrong_client", f"grant belongs to {claims.client}, not {client}")
    current = time.time() if now is None else now
    if claims.exp + leeway_s < current:
        raise GrantError("expired", f"grant expired {current - claims.exp:.0f}s ago")
    return claims
