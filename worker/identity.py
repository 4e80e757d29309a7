"""Who a worker is on the grid: its principal id (= worker id) and token.

The worker id *is* the MQTT username because the broker's ACLs key worker topics
(``{root}/worker/{wid}/...``) on it. It is kept in ``<state_dir>/identity.json``
(mode 0600, it holds a secret) so a restarted worker comes back as the same worker,
with the same retained caps/status topics and the same persistent MQTT session.

It comes from the state dir, or from what the worker was given explicitly (flags,
environment): never from the ``[bus]`` section of a config file, which holds the
*client's* credentials (``xcloud up`` writes its admin there). A new identity is saved
only after the broker accepted it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.config import BusConfig, Config
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


@dataclass(frozen=True)
class Identity:
    """Who the worker connects as. ``saved`` when ``identity.json`` already holds exactly
    this; an explicit identity that does not is saved only once the broker accepted it
    (``save_accepted``), so a mistyped ``--id/--token`` never replaces a working one."""

    wid: str
    token: str = field(repr=False)
    saved: bool = True

    def save_accepted(self, state_dir: Path | str) -> bool:
        """Save this identity now that the broker accepted it; False when it already was."""
        if self.saved:
            return False
        save_identity(state_dir, self.wid, self.token)
        log.info("worker %s: identity saved in %s (the broker accepted it)", self.wid,
                 identity_path(state_dir))
        return True


def explicit_bus_identity(config: Config) -> BusConfig:
    """``config.bus`` with only the identity given to the worker explicitly: the flags
    ``--id/--token``, else ``worker.principal``/``worker.token`` (the worker's own keys: a
    ``[worker]`` section, ``XCLOUD_WORKER_PRINCIPAL``/``_TOKEN``), else
    ``XCLOUD_BUS_PRINCIPAL``/``XCLOUD_BUS_TOKEN`` or ``config.bus`` set in code. The
    ``[bus]`` principal and token of a config file are the client's (``xcloud up``
    writes its admin there) and never the worker's."""
    bus = config.bus

    def given(key: str) -> str:
        return "" if config.origin("bus", key) == "file" else str(getattr(bus, key))

    principal, token = given("principal"), given("token")
    flagged = config.origin("bus", "principal") == "flags"
    if config.worker.principal and not flagged:
        principal, token = config.worker.principal, config.worker.token
    elif config.worker.token and not principal and config.origin("bus", "token") != "flags":
        token = config.worker.token
    return dataclasses.replace(bus, principal=principal, token=token)


def load_identity(state_dir: Path | str, bus_config: BusConfig) -> Identity:
    """The identity to connect as: an explicit ``bus_config.principal`` first (see
    ``explicit_bus_identity``), else the stored one; IdentityError when there is none.

    Nothing is written here: an explicit identity other than the stored one is returned
    with ``saved=False`` and saved by the agent once the broker accepted it. An explicit
    principal without a token reuses the stored token of the same principal; a token
    alone applies to the stored principal.
    """
    path = identity_path(state_dir)
    principal, token = bus_config.principal, bus_config.token
    try:
        stored = _read(path)
    except IdentityError:
        if not principal:
            raise
        stored = None  # an explicit identity replaces a broken file (once accepted)
    if principal:
        if not valid_principal_id(principal):
            raise IdentityError(
                f"invalid worker id {principal!r}: must be 1-128 chars without / + # or NUL"
            )
        same = stored is not None and stored.get("wid") == principal
        if not token and same:
            assert stored is not None
            token = str(stored.get("token", ""))
        if stored and not same:
            log.info("worker id %s given explicitly (the state dir holds %s); it is kept "
                     "once the broker accepts it", principal, stored.get("wid"))
        saved = same and stored is not None and stored.get("token", "") == token
        return Identity(principal, token, saved=saved)
    if stored is None:
        raise IdentityError(f"this worker has no identity yet (no {path}): {_HOW_TO}")
    wid = str(stored["wid"])
    if not valid_principal_id(wid):
        raise IdentityError(f"worker identity {path} holds an invalid id {wid!r}; {_HOW_TO}")
    stored_token = str(stored.get("token", ""))
    return Identity(wid, token or stored_token, saved=not token or token == stored_token)
