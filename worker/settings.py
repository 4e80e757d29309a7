"""The worker's own settings, kept in its state dir: a restart without flags keeps them.

``name``, ``description``, ``tags`` and ``slots`` describe what the owner offers. Given
at a start (a flag, ``XCLOUD_WORKER_*``, the ``[worker]`` section of a config file, or
code), a setting is used and saved in ``<state_dir>/settings.json``; not given, the
saved value is used; neither, the default. So ``xcloud worker --tags gpu --slots 2``
once, then plain ``xcloud worker``, comes back with the same tags and slots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from broker.config import Config, WorkerConfig

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
PERSISTED = ("name", "description", "tags", "slots")


def settings_path(state_dir: Path | str) -> Path:
    return Path(state_dir).expanduser() / SETTINGS_FILE


def _valid(key: str, value: Any) -> bool:
    if key in ("name", "description"):
        return isinstance(value, str)
    if key == "tags":
        return isinstance(value, list) and all(isinstance(t, str) for t in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_settings(state_dir: Path | str) -> dict[str, Any]:
    """The saved settings (only well-formed ones; a broken file counts as none)."""
    path = settings_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable worker settings %s: %s", path, err)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring malformed worker settings %s", path)
        return {}
    return {k: data[k] for k in PERSISTED if k in data and _valid(k, data[k])}


def save_settings(state_dir: Path | str, values: dict[str, Any]) -> None:
    """Write the settings atomically (0600 in a 0700 state dir)."""
    path = settings_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{SETTINGS_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def given(config: Config, key: str) -> bool:
    """Was ``worker.<key>`` given for this start? By a layer of load_config, or in code
    (a value other than the default: code has no layer to record)."""
    if config.origin("worker", key) is not None:
        return True
    return bool(getattr(config.worker, key) != getattr(WorkerConfig(), key))


def effective_settings(config: Config, state_dir: Path | str) -> WorkerConfig:
    """``config.worker`` with the saved settings filled in where none was given; saves
    the result when it changed."""
    saved = read_settings(state_dir)
    values = {key: (getattr(config.worker, key) if given(config, key) or key not in saved
                    else saved[key]) for key in PERSISTED}
    kept = [k for k in PERSISTED if not given(config, k) and k in saved]
    if kept:
        log.info("worker settings kept from %s: %s", settings_path(state_dir),
                 ", ".join(f"{k}={values[k]!r}" for k in kept))
    if values != saved:
        try:
            save_settings(state_dir, values)
        except OSError as err:
            log.warning("cannot save the worker settings in %s: %s",
                        settings_path(state_dir), err)
    return dataclasses.replace(config.worker, **values)
