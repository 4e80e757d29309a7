"""The coordinator's grant-signing key: Ed25519, kept in ``<data_dir>/grant_key.pem``.

Why a file and not the database: workers pin the public key on first use, so it must
survive restarts and database moves, and the private half should be readable by the
coordinator's Unix user only (mode 0600), never by anyone who can read the database.
The key is created on first start; concurrent first starts agree on one key (the file
is linked into place exclusively, the loser reads the winner's key).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.errors import CoordinatorError
from schemas.grants import key_id, public_key_to_text, sign_grant
from schemas.messages import CoordPubkey

log = logging.getLogger(__name__)

KEY_FILE = "grant_key.pem"


class GrantKeyError(CoordinatorError):
    """The grant key file cannot be read, written or parsed."""


@dataclass(frozen=True)
class GrantKey:
    """The private key that signs grants, and what the grid needs to verify them."""

    private: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def public_text(self) -> str:
        """Base64 of the raw public key, as ``coord.pubkey.key`` and worker configs hold it."""
        return public_key_to_text(self.public)

    @property
    def kid(self) -> str:
        return key_id(self.public)

    def pubkey_message(self) -> CoordPubkey:
        """The retained ``coord.pubkey`` announcement."""
        return CoordPubkey(alg="ed25519", key=self.public_text, kid=self.kid)

    def sign(self, *, rid: str, client: str, worker: str, exp: float,
             iat: float | None = None) -> str:
        """A grant for ``client`` on ``worker`` under reservation ``rid``, valid until ``exp``."""
        return sign_grant(self.private, rid=rid, client=client, worker=worker, exp=exp, iat=iat)


def load_or_create_grant_key(data_dir: Path | str) -> GrantKey:
    """The key in ``<data_dir>/grant_key.pem``, created (mode 0600) when missing.

    A key file readable by others is tightened to 0600 with a warning rather than
    refused: refusing would take the grid down for a fixable permission.
    """
    directory = Path(data_dir).expanduser()
    path = directory / KEY_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("grant key %s had mode %o; tightening to 0600", path, mode)
            path.chmod(0o600)
        data = path.read_bytes()
    except OSError as err:
        raise GrantKeyError(f"cannot use the grant key file {path}: {err.strerror or err}; "
                            "check that the data directory is writable by the coordinator"
                            ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise GrantKeyError(f"{path} is not a PEM private key ({err}); move it away to "
                            "create a new one (workers that pinned the old key must be "
                            "told the new one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise GrantKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return GrantKey(private=key, path=path)


def _create(path: Path) -> None:
    """Write a fresh key next to ``path``, then link it into place unless one appeared."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(prefix=".grant_key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            log.info("created grant signing key %s", path)
        except FileExistsError:
            pass  # another coordinator created it first: use theirs
    finally:
        os.unlink(tmp)
