"""Tokens and their hashes, in Mosquitto's password-file format.

A principal authenticates with its id as the MQTT username and a random token as the
password. Only hashes are stored, and they use Mosquitto's ``$7$`` format
(PBKDF2-HMAC-SHA512, as written by ``mosquitto_passwd``) so the same hashes can be
exported verbatim to an external Mosquitto broker (see ``broker.mosquitto``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

# mosquitto_passwd: 12-byte salt, 101 iterations, SHA-512 (64-byte digest).
HASH_ID = "7"
SALT_BYTES = 12
ITERATIONS = 101
DIGEST = "sha512"
_MAX_ITERATIONS = 1_000_000  # refuse absurd iteration counts in stored hashes (CPU DoS)


def new_token() -> str:
    """A fresh random token: 32 bytes of entropy, URL-safe (fits MQTT passwords, shells).

    Never one that starts with ``-``: ``xcloud worker --token -Xy…`` would be taken for an
    option (one token in 64 did, and the README's worker command then failed).
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def _derive(token: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac(DIGEST, token.encode("utf-8"), salt, iterations)


def hash_token(token: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """Hash ``token`` as ``$7$<iterations>$<b64 salt>$<b64 hash>`` (Mosquitto-compatible)."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _derive(token, salt, iterations)
    return "${}${}${}${}".format(
        HASH_ID,
        iterations,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def parse_hash(stored_hash: str) -> tuple[int, bytes, bytes] | None:
    """Split a ``$7$`` hash into (iterations, salt, digest); None when malformed."""
    parts = stored_hash.split("$")
    # "$7$101$salt$hash" -> ["", "7", "101", "salt", "hash"]
    if len(parts) != 5 or parts[0] != "" or parts[1] != HASH_ID:
        return None
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return None
    if not 1 <= iterations <= _MAX_ITERATIONS or not salt or len(digest) != 64:
        return None
    return iterations, salt, digest


def verify_token(token: str, stored_hash: str) -> bool:
    """True when ``token`` matches ``stored_hash``; the digest comparison is constant-time."""
    parsed = parse_hash(stored_hash)
    if parsed is None:
        return False
    iterations, salt, digest = parsed
    return hmac.compare_digest(_derive(token, salt, iterations), digest)
