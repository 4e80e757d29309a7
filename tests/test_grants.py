"""Grants (schemas/grants.py): what a worker honours and what it refuses, with the reason code.

Also the coordinator's key file (coordinator/keys.py): created once with mode 0600, reused,
and its grants verify with the published public key text.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.keys import GrantKeyError, load_or_create_grant_key
from schemas.grants import (
    MAX_GRANT,
    GrantError,
    key_id,
    public_key_from_text,
    public_key_to_text,
    sign_grant,
    verify_grant,
)

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def private() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _grant(private: Ed25519PrivateKey, **overrides: object) -> str:
    claims: dict[str, object] = {"rid": "r-1", "client": "alice", "worker": "w1",
                                 "exp": NOW + 30, "iat": NOW}
    claims.update(overrides)
    return sign_grant(private, **claims)  # type: ignore[arg-type]


def _code(private: Ed25519PrivateKey, grant: str, **kwargs: object) -> str:
    args: dict[str, object] = {"client": "alice", "worker": "w1", "now": NOW}
    args.update(kwargs)
    with pytest.raises(GrantError) as info:
        verify_grant(private.public_key(), grant, **args)  # type: ignore[arg-type]
    return info.value.code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_valid_grant_yields_its_claims(private: Ed25519PrivateKey) -> None:
    claims = verify_grant(private.public_key(), _grant(private), client="alice", worker="w1",
                          now=NOW)
    assert (claims.rid, claims.client, claims.worker) == ("r-1", "alice", "w1")
    assert (claims.iat, claims.exp) == (NOW, NOW + 30)
    assert claims.kid == key_id(private.public_key())


def test_expired_grant(private: Ed25519PrivateKey) -> None:
    grant = _grant(private, exp=NOW - 10)
    assert _code(private, grant) == "expired"
    # within the leeway (clock skew between coordinator and worker) it still passes
    verify_grant(private.public_key(), _grant(private, exp=NOW - 1), client="alice",
                 worker="w1", now=NOW, leeway_s=2.0)
    assert _code(private, _grant(private, exp=NOW - 1), leeway_s=0.0) == "expired"


def test_wrong_client(private: Ed25519PrivateKey) -> None:
    assert _code(private, _grant(private), client="mallory") == "wrong_client"


def test_wrong_worker(private: Ed25519PrivateKey) -> None:
    assert _code(private, _grant(private), worker="w2") == "wrong_worker"


def test_signature_of_another_key(private: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    assert _code(private, _grant(other)) == "bad_signature"


@pytest.mark.parametrize("grant", [
    "", "nodot", "a.b.c", "!!!.???", "a" * (MAX_GRANT + 1), ".",
])
def test_malformed(private: Ed25519PrivateKey, grant: str) -> None:
    assert _code(private, grant) in ("malformed", "bad_signature")
    if grant.count(".") != 1 or len(grant) > MAX_GRANT:
        assert _code(private, grant) == "malformed"


def test_not_a_string_is_malformed(private: Ed25519PrivateKey) -> None:
    assert _code(private, 42) == "malformed"  # type: ignore[arg-type]


def test_tampered_claims_are_refused(private: Ed25519PrivateKey) -> None:
    payload, signature = _grant(private).split(".")
    claims = json.loads(_unb64(payload))
    claims["exp"] = NOW + 10_000  # extend my own lease
    forged = f"{_b64(json.dumps(claims).encode())}.{signature}"
    assert _code(private, forged) == "bad_signature"
    claims["client"], claims["exp"] = "mallory", NOW + 30  # take someone's grant
    forged = f"{_b64(json.dumps(claims).encode())}.{signature}"
    assert _code(private, forged, client="mallory") == "bad_signature"


def test_signed_but_unreadable_claims_are_malformed(private: Ed25519PrivateKey) -> None:
    for payload in (b"not json", b'{"rid": "r"}', json.dumps(
            {"v": 2, "rid": "r", "client": "alice", "worker": "w1", "iat": NOW,
             "exp": NOW + 30}).encode()):
        grant = f"{_b64(payload)}.{_b64(private.sign(payload))}"
        assert _code(private, grant) == "malformed"


def test_public_key_text_round_trip(private: Ed25519PrivateKey) -> None:
    text = public_key_to_text(private.public_key())
    restored = public_key_from_text(text)
    verify_grant(restored, _grant(private), client="alice", worker="w1", now=NOW)
    with pytest.raises(GrantError) as info:
        public_key_from_text("not base64!")
    assert info.value.code == "bad_key"
    with pytest.raises(GrantError):
        public_key_from_text(base64.b64encode(b"short").decode())


# ---------------------------------------------------------------------- coordinator key


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    first = load_or_create_grant_key(tmp_path / "data")
    assert first.path == tmp_path / "data" / "grant_key.pem"
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    again = load_or_create_grant_key(tmp_path / "data")
    assert again.public_text == first.public_text
    assert again.kid == first.kid
    assert [p.name for p in first.path.parent.iterdir()] == ["grant_key.pem"]
    grant = first.sign(rid="r-9", client="bob", worker="w7", exp=NOW + 5, iat=NOW)
    claims = verify_grant(public_key_from_text(again.pubkey_message().key), grant,
                          client="bob", worker="w7", now=NOW)
    assert claims.kid == again.pubkey_message().kid


def test_loose_key_file_mode_is_tightened(tmp_path: Path) -> None:
    key = load_or_create_grant_key(tmp_path)
    key.path.chmod(0o644)
    load_or_create_grant_key(tmp_path)
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600


def test_garbage_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "grant_key.pem").write_text("garbage")
    with pytest.raises(GrantKeyError, match="not a PEM private key"):
        load_or_create_grant_key(tmp_path)
