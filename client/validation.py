"""What a request may carry, checked before it is sent, in the user's words.

The wire contract (schemas/json) bounds every field; a request outside those bounds
would fail as ``invalid: outgoing workers.list: data.state[0] must be one of ...``.
These checks read the same bounds from the schemas (one source of truth) and say what
was wrong with what the user typed instead. All raise ``InvalidRequest``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from client.errors import InvalidRequest
from schemas.registry import resolved_schema


@functools.cache
def _props(message_type: str) -> dict[str, Any]:
    props: dict[str, Any] = resolved_schema(message_type)["properties"]
    return props


def _choices(values: Iterable[str]) -> str:
    items = list(values)
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else "".join(items)


def worker_states() -> list[str]:
    """The states a worker can be in, as the listing filter accepts them."""
    states: list[str] = _props("workers.list")["state"]["items"]["enum"]
    return states


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{what} must be a whole number, not {value!r}")
    if value < 0:
        raise InvalidRequest(f"{what} must be 0 or more, not {value}")
    return value


def _text(value: Any, what: str, schema: dict[str, Any]) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text, not {value!r}")
    top = schema.get("maxLength")
    if top is not None and len(value) > top:
        raise InvalidRequest(f"{what} is {len(value)} characters long; at most {top}")
    if len(value) < schema.get("minLength", 0):
        raise InvalidRequest(f"{what} must not be empty")
    return value


def _tags(tags: Iterable[str], schema: dict[str, Any]) -> list[str]:
    items = list(tags)
    top = schema.get("maxItems")
    if top is not None and len(items) > top:
        raise InvalidRequest(f"{len(items)} tags; at most {top}")
    return [_text(t, f"tag {t!r}", schema["items"]) for t in items]


def check_worker(worker: str) -> str:
    """A worker id or name as a request names it."""
    return _text(worker, "a worker id or name", _props("workers.show")["worker"])


def check_filters(*, state: list[str] | None, tags: list[str] | None,
                  min_cpus: int | None, min_memory_bytes: int | None,
                  name: str | None) -> None:
    """The filters of the worker listing."""
    props = _props("workers.list")
    allowed = worker_states()
    for s in state or []:
        if s not in allowed:
            raise InvalidRequest(f"unknown state {s!r}; choose {_choices(allowed)}")
    if tags:
        _tags(tags, props["tags"])
    if min_cpus is not None:
        _count(min_cpus, "the minimum number of cpus")
    if min_memory_bytes is not None:
        _count(min_memory_bytes, "the minimum memory")
    if name is not None:
        _text(name, "the worker name", props["name"])


def check_requirements(requirements: dict[str, Any]) -> None:
    """The ``any`` requirements of a reservation."""
    props = _props("reserve")["any"]["properties"]
    for key, value in requirements.items():
        if key not in props:
            raise InvalidRequest(f"unknown requirement {key!r}; choose "
                                 f"{_choices(sorted(props))}")
        if key == "min_cpus":
            _count(value, "the minimum number of cpus")
        elif key == "min_memory_bytes":
            _count(value, "the minimum memory")
        elif key in ("gpus", "gpu_memory_bytes"):  # docs/gpus.md
            top = props[key].get("maximum")
            if _count(value, f"the {key}") > (top if top is not None else value):
                raise InvalidRequest(f"{key} is at most {top}, not {value}")
        elif key == "tags":
            _tags(value, props["tags"])
        elif key == "executor":
            choices = props["executor"]["enum"]
            if value not in choices:
                raise InvalidRequest(f"unknown executor {value!r}; choose {_choices(choices)}")
        else:
            _text(value, key, props[key])


def lease_bounds() -> tuple[float, float]:
    """The shortest and longest lease a reservation may ask for (the coordinator may
    still cut a long one to its ``max_lease_s``)."""
    schema = _props("reserve")["lease_s"]
    return float(schema["minimum"]), float(schema["maximum"])


def check_lease(lease_s: float) -> float:
    low, high = lease_bounds()
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) \
            or not math.isfinite(lease_s) or not low <= lease_s <= high:
        raise InvalidRequest(f"a lease of {lease_s!r} seconds is out of range: "
                             f"choose {low:g} to {high:g} seconds")
    return float(lease_s)


def check_image(image: str) -> str:
    return _text(image, "the image name", _props("reserve")["image"])


def max_command_length() -> int:
    top: int = _props("exec.start")["command"]["maxLength"]
    return top


def check_command(command: str) -> str:
    """A remote command line: not empty, not longer than a message may carry."""
    if not command.strip():
        raise InvalidRequest("empty command")
    top = max_command_length()
    if len(command) > top:
        raise InvalidRequest(f"the command is {len(command):,} characters long; at most "
                             f"{top:,} (put a longer script in a file on the worker and "
                             "run that)")
    return command


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and (isinstance(timeout, bool)
                                or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise InvalidRequest(f"a timeout must be a positive number of seconds, not "
                             f"{timeout!r}")
    return timeout
