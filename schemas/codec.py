"""Encode, decode and validate wire messages.

``decode`` is the edge: it turns bytes into an ``Envelope`` holding a typed ``Body``, or
raises one ``WireError`` that says why. Nothing unvalidated gets past it.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import fastjsonschema

from schemas.errors import WireError
from schemas.messages import REGISTRY, B, Body, Error
from schemas.registry import validator

DEFAULT_MAX_PAYLOAD = 4 * 1024 * 1024
ENVELOPE_KEYS = ("type", "v", "id", "ts", "reply_to", "re")

T = TypeVar("T", bound=Body)


def _reason(err: fastjsonschema.JsonSchemaException) -> str:
    return str(getattr(err, "message", None) or err)


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; they would also slip past every numeric bound."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number such as ``1e400`` parses as infinity: refuse it like Infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope(Generic[T]):
    """A validated message: envelope fields plus its typed body."""

    body: T
    id: str
    ts: float
    v: int = 1
    reply_to: str | None = None
    re: str | None = None

    @property
    def type(self) -> str:
        return self.body.TYPE


def envelope(body: B, *, reply_to: str | None = None, re: str | None = None) -> Envelope[B]:
    """Wrap a body in a fresh envelope (new id, current time)."""
    return Envelope(body=body, id=new_id(), ts=time.time(), v=body.V, reply_to=reply_to, re=re)


def to_wire(env: Envelope[Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"type": env.body.TYPE, "v": env.v, "id": env.id, "ts": env.ts}
    if env.reply_to is not None:
        data["reply_to"] = env.reply_to
    if env.re is not None:
        data["re"] = env.re
    data.update(env.body.to_dict())
    return data


def encode(env: Envelope[Any], *, validate: bool = True) -> bytes:
    """Serialise an envelope to JSON bytes; with ``validate`` the result is checked too,
    so a component never sends what its peers would reject."""
    data = to_wire(env)
    if validate:
        try:
            validator(env.body.TYPE)(data)
        except fastjsonschema.JsonSchemaException as err:
            raise WireError("invalid", f"outgoing {env.body.TYPE}: {_reason(err)}",
                            message_type=env.body.TYPE, message_id=env.id) from err
    return _dumps(data)


#: A top-level string at least this long is spliced into the JSON rather than dumped
#: (``_dumps``): base64 data of exec.stdin / exec.output pieces, up to 1.4 MB each.
SPLICE_MIN = 64 * 1024
_JSON_SAFE = bytes(c for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))  # no escaping


def _dumps(data: dict[str, Any]) -> bytes:
    """``json.dumps`` of a message, with its long strings that need no escaping spliced in
    as they are (last, in their order): json.dumps scans every character of a string for
    escapes, ~4 ms per MiB of base64 here, ten times the check below. Same JSON value."""
    spliced: list[tuple[str, bytes]] = []
    for key, value in data.items():
        if isinstance(value, str) and len(value) >= SPLICE_MIN and value.isascii():
            raw = value.encode("ascii")
            if not raw.translate(None, _JSON_SAFE):  # printable, no quote, no backslash
                spliced.append((key, raw))
    if not spliced:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    rest = {k: v for k, v in data.items() if k not in {key for key, _ in spliced}}
    head = json.dumps(rest, separators=(",", ":"), allow_nan=False).encode()
    parts = [head[:-1]]
    for key, raw in spliced:
        parts += [b"," if len(parts) > 1 or rest else b"", json.dumps(key).encode(), b':"',
                  raw, b'"']
    parts.append(b"}")
    return b"".join(parts)


@functools.cache
def _decoder() -> json.JSONDecoder:
    """One decoder for every message: ``json.loads`` with hooks builds a new one per call
    (1 % of the coordinator's CPU at full job rate)."""
    return json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def decode(payload: bytes, *, topic: str | None = None,
           max_payload: int = DEFAULT_MAX_PAYLOAD) -> Envelope[Body]:
    """Parse and validate one message; raise ``WireError`` with a reason otherwise."""
    if len(payload) > max_payload:
        raise WireError("too_large", f"payload of {len(payload)} bytes exceeds {max_payload}",
                        topic=topic)
    try:
        data = _decoder().decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError("bad_json", f"not JSON: {err}", topic=topic) from err
    except RecursionError as err:
        raise WireError("bad_json", "JSON nested too deeply", topic=topic) from err
    return from_wire(data, topic=topic)


def from_wire(data: Any, *, topic: str | None = None,
              carried_as: str | None = None) -> Envelope[Body]:
    """Validate one parsed message (a JSON object: ``decode``'s, or one carried inside
    another, as ``attempt.recorded`` carries ``job.assign``) and build its envelope.

    ``carried_as``: the type its carrier's (validated) schema held it to, so it needs no
    second validation (that was most of a carried ``job.assign``'s cost); another type
    is refused."""
    if carried_as is not None and isinstance(data, dict) and data.get("type") == carried_as:
        return _built(REGISTRY[carried_as], data)
    if carried_as is not None:
        raise WireError("invalid", f"a carried message that is not a {carried_as}",
                        topic=topic)
    if not isinstance(data, dict):
        raise WireError("bad_envelope", "message is not a JSON object", topic=topic)
    mtype, mid = data.get("type"), data.get("id")
    reply_to = data.get("reply_to") if isinstance(data.get("reply_to"), str) else None
    ctx: dict[str, Any] = {
        "topic": topic,
        "message_type": mtype if isinstance(mtype, str) else None,
        "message_id": mid if isinstance(mid, str) and 0 < len(mid) <= 64 else None,
        "reply_to": reply_to,
    }
    try:
        validator("envelope")(data)
    except fastjsonschema.JsonSchemaException as err:
        raise WireError("bad_envelope", _reason(err), **ctx) from err
    cls = REGISTRY.get(data["type"])
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {data['type']!r}", **ctx)
    if data["v"] != cls.V:
        raise WireError("unsupported_version",
                        f"{cls.TYPE} v{data['v']} is not supported (this side speaks v{cls.V})",
                        **ctx)
    try:
        validator(cls.TYPE)(data)
    except fastjsonschema.JsonSchemaException as err:
        raise WireError("invalid", f"{cls.TYPE}: {_reason(err)}", **ctx) from err
    return _built(cls, data)


def _built(cls: type[Body], data: dict[str, Any]) -> Envelope[Body]:
    """The envelope of a validated message."""
    body = cls.from_dict({k: v for k, v in data.items() if k not in ENVELOPE_KEYS})
    return Envelope(body=body, id=data["id"], ts=float(data["ts"]), v=data["v"],
                    reply_to=data.get("reply_to"), re=data.get("re"))


def error_for(err: WireError) -> Error:
    """The error body to send back for a rejected message."""
    return Error(code=err.code, message=err.reason)
