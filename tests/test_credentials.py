"""Token hashing: Mosquitto ``$7$`` compatibility both ways, constant-time verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.credentials import (
    ITERATIONS,
    SALT_BYTES,
    hash_token,
    new_token,
    parse_hash,
    verify_token,
)
from tests.fixtures.services import write_mosquitto_passwords


def test_new_token_is_random_and_long() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) >= 43 for t in tokens)


def test_new_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # `xcloud worker --token -Xy…` is an argparse error: such a token is drawn again.
    drawn = iter(["-" + "a" * 42, "-" + "b" * 42, "c" * 43])
    monkeypatch.setattr("broker.credentials.secrets.token_urlsafe", lambda _n: next(drawn))
    assert new_token() == "c" * 43


def test_hash_format_matches_mosquitto_layout() -> None:
    h = hash_token("s3cret")
    parts = h.split("$")
    assert parts[0] == ""
    assert parts[1] == "7"
    assert parts[2] == str(ITERATIONS)
    parsed = parse_hash(h)
    assert parsed is not None
    iterations, salt, digest = parsed
    assert iterations == ITERATIONS
    assert len(salt) == SALT_BYTES
    assert len(digest) == 64
    assert hash_token("s3cret") != h  # fresh salt every time


def test_verify_roundtrip() -> None:
    token = new_token()
    h = hash_token(token)
    assert verify_token(token, h)
    assert not verify_token(token + "x", h)
    assert not verify_token("", h)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "$6$abc$def",
        "$7$101$!!!$AAAA",
        "$7$x$AAAA$AAAA",
        "$7$101$AAAA$AAAA",
        "$7$0$AAAA$" + "A" * 88,
        "$7$99999999$AAAA$" + "A" * 88,
    ],
)
def test_verify_rejects_malformed_hashes(bad: str) -> None:
    assert not verify_token("anything", bad)


def test_known_vector_from_mosquitto_passwd() -> None:
    # Generated with `mosquitto_passwd -b pw alice secret` (mosquitto 2.0.11).
    stored = (
        "$7$101$DxM44+/AYG9n70VL$euKaRhcwrW14kar0A9wztOEAm1266OHJzC8UNax2Q3m4ITFAMU0B/"
        "UYKgWYZeqCrkkW2dMRpq2mfLOzQNkXxgw=="
    )
    assert verify_token("secret", stored)
    assert not verify_token("Secret", stored)


@pytest.mark.mosquitto
def test_verify_hash_written_by_mosquitto_passwd(tmp_path: Path) -> None:
    token = new_token()
    pw = write_mosquitto_passwords(tmp_path / "passwd", {"bob": token})
    user, stored = pw.read_text().strip().split(":", 1)
    assert user == "bob"
    assert verify_token(token, stored)
    assert not verify_token(token[:-1], stored)
