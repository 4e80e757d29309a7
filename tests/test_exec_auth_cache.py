"""ExecAuthorizer checks a grant's signature once and its expiry at every use
(worker/exec_auth.py): an ed25519 verification costs ~130 us, paid before on every
exec.stdin, i.e. every keystroke of a terminal. What the cache must never do: serve
another sender, outlive the grant, or survive a new coordinator key."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import schemas.grants as grants
import worker.exec_auth as exec_auth
from schemas.grants import sign_grant
from worker.exec_auth import ExecAuthorizer


class _Bus:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict[str, Any] | None]] = []

    def reply_error(self, _incoming: Any, code: str, _message: str,
                    detail: dict[str, Any] | None = None) -> None:
        self.errors.append((code, detail))


def _setup(monkeypatch: pytest.MonkeyPatch) -> tuple[ExecAuthorizer, _Bus, Any, list[int]]:
    bus = _Bus()
    key: Any = SimpleNamespace(key=Ed25519PrivateKey.generate().public_key())
    session: Any = SimpleNamespace(closing=False, record=SimpleNamespace(client="alice"))
    bus_: Any = bus
    auth = ExecAuthorizer(bus_, "w1", key, lambda rid: session if rid == "r1" else None)
    calls: list[int] = []
    real = grants.verify_grant

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(exec_auth, "verify_grant", counted)
    return auth, bus, key, calls


def _incoming(sender: str) -> Any:
    return SimpleNamespace(sender=sender, message=SimpleNamespace(type="exec.stdin"))


def test_a_grant_is_verified_once_and_its_expiry_checked_every_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    signer = Ed25519PrivateKey.generate()
    auth, bus, key, calls = _setup(monkeypatch)
    key.key = signer.public_key()
    grant = sign_grant(signer, rid="r1", client="alice", worker="w1", exp=time.time() + 60)
    for _ in range(5):
        assert auth.authorize(_incoming("alice"), grant) is not None
    assert len(calls) == 1
    # another sender presenting alice's grant is checked, and refused
    assert auth.authorize(_incoming("mallory"), grant) is None
    assert bus.errors[-1][1] == {"reason": "wrong_client"}
    # past its expiry (and the leeway) the remembered grant is refused
    later = time.time() + 60 + exec_auth.EXPIRY_LEEWAY_S + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert auth.authorize(_incoming("alice"), grant) is None
    assert bus.errors[-1][1] == {"reason": "expired"}


def test_a_new_coordinator_key_forgets_what_the_old_one_verified(
        monkeypatch: pytest.MonkeyPatch) -> None:
    old = Ed25519PrivateKey.generate()
    auth, bus, key, calls = _setup(monkeypatch)
    key.key = old.public_key()
    grant = sign_grant(old, rid="r1", client="alice", worker="w1", exp=time.time() + 60)
    assert auth.authorize(_incoming("alice"), grant) is not None
    key.key = Ed25519PrivateKey.generate().public_key()  # rotated
    assert auth.authorize(_incoming("alice"), grant) is None
    assert bus.errors[-1][1] == {"reason": "bad_signature"}
    assert len(calls) == 2
