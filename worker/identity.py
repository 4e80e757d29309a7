"""Who a worker is on the grid: its principal id (= worker id) and token.

The worker id *is* the MQTT username because the broker's ACLs key worker topics
(``{root}/worker/{wid}/...``) on it. It is kept in ``<state_dir>/identity.json``
(mode 0600, it holds a secret) so a restarted worker comes back as the same worker,
with the same retained caps/status topics and the same persistent MQTT session.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from broker.config import BusConfig
from schemas.topics import valid_principal_id
from worker.errors import IdentityError

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"

_HOW_TO = (
    "create a worker principal with `xcloud admin principal add NAME --role worker` "
    "and start the worker with `--id NAME --token TOKEN` (or use `xcloud up`, which "
    "provisions local workers)"
)


def identity_path(state_dir: Path | str) -> Path:
    return Path(state_dir).expanduser() / IDENTITY_FILE


def _read(path: Path) -> dict[str, Any] | None:
    """The stored identity document, None when there is none; IdentityError when corrupt."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise IdentityError(f"cannot read worker identity {path}: {err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise IdentityError(
            f"worker identity {path} is not valid JSON ({err}); delete it and {_HOW_TO}"
        ) from err
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("wid"), str)
        or not isinstance(data.get("token", ""), str)
    ):
        raise IdentityError(f"worker identity {path} is malformed; delete it and {_HOW_TO}")
    return data


def save_identity(state_dir: Path | str, wid: str, token: str) -> Path:
    """Write ``identity.json`` atomically with mode 0600; keeps ``created_at`` for the same id."""
    if not valid_principal_id(wid):
        raise IdentityError(
            f"invalid worker id {wid!r}: must be 1-128 chars without / + # or NUL"
        )
    path = identity_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    created_at = time.time()
    try:
        old = _read(path)
    except IdentityError:
        old = None
    if old and old.get("wid") == wid and isinstance(old.get("created_at"), (int, float)):
        created_at = float(old["created_at"])
    doc = {"wid": wid, "token": token, "created_at": created_at}
    tmp = path.with_name(f".{IDENTITY_FILE}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise IdentityError(f"cannot save worker identity to {path}: {err}") from err
    return path


def load_identity(state_dir: Path | str, bus_config: BusConfig) -> tuple[str, str]:
    """Return ``(wid, token)``: explicit configuration first, else the stored identity.

    An explicit ``bus_config.principal`` (flag, environment or config file) wins and is
    saved, so the id stays stable when the worker is later started without it. An
    explicit principal without a token reuses the stored token of the same principal.
    """
    path = identity_path(state_dir)
    principal, token = bus_config.principal, bus_config.token
    try:
        stored = _read(path)
    except IdentityError:
        if not principal:
            raise
        stored = None  # an explicit identity replaces a broken file
    if principal:
        if not valid_principal_id(principal):
            raise IdentityError(
                f"invalid worker id {principal!r}: must be 1-128 chars without / + # or NUL"
            )
        if not token and stored and stored.get("wid") == principal:
            token = str(stored.get("token", ""))
        if not stored or stored.get("wid") != principal or stored.get("token", "") != token:
            if stored and stored.get("wid") != principal:
                log.info("worker id changed from %s to %s (explicit)", stored.get("wid"), principal)
            save_identity(state_dir, principal, token)
        return principal, token
    if stored is None:
        raise IdentityError(f"this worker has no identity yet (no {path}): {_HOW_TO}")
    wid = str(stored["wid"])
    if not valid_principal_id(wid):
        raise IdentityError(f"worker identity {path} holds an invalid id {wid!r}; {_HOW_TO}")
    if token and token != stored.get("token", ""):
        save_identity(state_dir, wid, token)
    return wid, token or str(stored.get("token", ""))
