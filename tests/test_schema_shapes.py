"""The wire contract's shapes: one definition per identifier shape, shared by every
schema, and every field an untrusted sender fills bounded, so that the largest documents
(caps, heartbeats) still fit the replies that carry them (docs/protocol.md, "Bounds").
The schema files, the codec and the AsyncAPI file are
tests/test_schemas.py's.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from schemas.codec import decode, encode, envelope
from schemas.errors import WireError
from schemas.messages import WorkerCaps, WorkerHeartbeat
from schemas.registry import SCHEMA_DIR
from tests.test_schemas import (
    SCHEMA_FILES,
    _pointer,
    _type_of,
    dumps,
    raw_schema,
    reject,
    wire,
)

ENVELOPE_FILE = "envelope.json"
ID_DEFINITIONS = frozenset({
    "message_id", "principal_id", "worker_id", "client_id", "worker_ref", "reservation_id",
    "exec_id", "session_id", "key_id", "data_id", "xfer_id", "sha256",
    "job_id", "attempt_id", "batch_id",
})
IDENTIFIER_NAMES: dict[str, frozenset[str]] = {
    "wid": frozenset({"worker_id"}),
    "worker": frozenset({"worker_id", "worker_ref"}),
    "reservation": frozenset({"reservation_id"}),
    "rid": frozenset({"reservation_id"}),
    "exec_id": frozenset({"exec_id"}),
    "session": frozenset({"session_id"}),
    "principal": frozenset({"principal_id"}),
    "principals": frozenset({"principal_id"}),
    "client": frozenset({"client_id"}),
    "owner": frozenset({"principal_id"}),
    "share": frozenset({"principal_id"}),
    "after": frozenset({"principal_id", "job_id"}),
    "job": frozenset({"job_id"}),
    "attempt": frozenset({"attempt_id"}),
    "batch": frozenset({"batch_id"}),
    "cursor": frozenset({"principal_id"}),
    "tid": frozenset({"xfer_id"}),
    "kid": frozenset({"key_id"}),
    "sha256": frozenset({"sha256"}),
    "re": frozenset({"message_id"}),
}
# Properties named like an identifier that hold a document about the thing, not its id.
DOCUMENTS = frozenset({
    ("reserve.reply", "reservation"), ("reservation.open", "reservation"),
    ("workers.show.reply", "worker"), ("principals.list.reply", "principals"),
    ("jobs.show.reply", "job"),
})
NOT_IDENTIFIERS = {
    ("audit.list.reply", "records[].id"): "the audit row's number",
    ("mosquitto.export.reply", "principals"): "how many principals were exported",
}


def _is_identifier(name: str) -> bool:
    return name in IDENTIFIER_NAMES or name == "id" or name.endswith("_id")


def _local(doc: dict[str, Any], ref: str) -> Any:
    """Follow a reference inside the same file (``#/definitions/caps/properties/wid``)."""
    return _pointer(doc, ref.partition("#")[2])


def _id_definition(doc: dict[str, Any], node: Any, envelope_doc: bool = False) -> str | None:
    """The envelope definition an identifier property uses (following references inside
    its own file, such as a message property pointing at its document's property), or
    None when it is an inline shape."""
    for _ in range(8):
        if not isinstance(node, dict) or set(node) - {"$ref", "description"}:
            return None
        file, _, fragment = node["$ref"].partition("#")
        parts = [p for p in fragment.split("/") if p]
        if file == ENVELOPE_FILE or (file == "" and envelope_doc and len(parts) == 2):
            name = parts[-1]
            return name if len(parts) == 2 and name in ID_DEFINITIONS else f"({name})"
        if file:
            return f"(elsewhere: {file}#{fragment})"
        node = _pointer(doc, fragment)
    return None


def _identifier_properties(doc: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(path, property name, schema) of every property named like an identifier."""
    found: list[tuple[str, str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                for name, schema in props.items():
                    here = f"{path}.{name}".lstrip(".")
                    if _is_identifier(name) and schema is not True:
                        found.append((here, name, schema))
                    walk(schema, here)
            for key, value in node.items():
                if key == "properties":
                    continue
                walk(value, f"{path}[]" if key == "items" else path)
        elif isinstance(node, list):
            for value in node:
                walk(value, path)

    walk(doc, "")
    return found


def test_every_identifier_uses_the_shared_definition() -> None:
    """One shape per identifier (issue 8, item 9): a property named like one (``wid``,
    ``worker``, ``reservation``, ``exec_id``, ``session``, ``client``, ``*_id``, ``id`` ...)
    must be a $ref to its definition in envelope.json, never an inline copy that can
    drift (as heartbeat's reservation ids of 128 characters against close's 64 did)."""
    problems: list[str] = []
    checked = 0
    for path in SCHEMA_FILES:
        doc = raw_schema(path)
        for where, name, schema in _identifier_properties(doc):
            if (path.stem, where) in NOT_IDENTIFIERS:
                continue
            target = schema.get("items", schema) if schema.get("type") == "array" else schema
            used = _id_definition(doc, target, path.name == ENVELOPE_FILE)
            allowed = IDENTIFIER_NAMES.get(name, ID_DEFINITIONS)
            checked += 1
            if used in allowed:
                continue
            if (path.stem, where) in DOCUMENTS:
                continue
            want = "|".join(sorted(allowed))
            problems.append(f"{path.name}: {where} is {json.dumps(target)[:100]} "
                            f"(want a $ref to envelope.json#/definitions/{want})")
    assert checked > 60, "the walk found too few identifiers to be trusted"
    assert not problems, "\n".join(problems)


def test_identifier_patterns_live_only_in_the_envelope() -> None:
    """No inline copy of an identifier's pattern under another name either."""
    definitions = raw_schema(SCHEMA_DIR / ENVELOPE_FILE)["definitions"]
    patterns = {definitions[name]["pattern"] for name in ID_DEFINITIONS
                if "pattern" in definitions.get(name, {})}
    assert patterns
    for path in SCHEMA_FILES:
        if path.name == ENVELOPE_FILE:
            continue
        text = path.read_text()
        for pattern in patterns:
            assert json.dumps(pattern) not in text, f"{path.name} repeats {pattern}"


def test_the_identifier_walk_catches_an_inline_identifier() -> None:
    """The walk above is not vacuous: an inline id shape is reported."""
    doc = {"properties": {"holder": {"type": "object", "properties": {
        "client": {"type": "string", "maxLength": 128},
        "wid": {"$ref": "envelope.json#/definitions/worker_id"}}}}}
    found = {where: _id_definition(doc, schema) for where, _, schema
             in _identifier_properties(doc)}
    assert found == {"holder.client": None, "holder.wid": "worker_id"}


RESERVATION_IDS = ["r-0123456789abcdef", "r1", "x" * 64, "x" * 65, "x" * 100, "x" * 128, "",
                   "r 1", "r/1", "r\u00e9", "r\u0000"]


@pytest.mark.parametrize("rid", RESERVATION_IDS, ids=lambda r: f"{r[:8]!r}x{len(r)}")
def test_heartbeat_and_close_agree_on_reservation_ids(rid: str) -> None:
    """Whatever a heartbeat may list as a running reservation, reservation.close can name
    (and the other way round): the coordinator closes what heartbeats report stale."""
    beat = wire("worker.heartbeat", running=[{"kind": "reservation", "id": rid}])
    close = wire("reservation.close", reservation=rid)
    renew = wire("renew", reservation=rid)
    verdicts = set()
    for doc in (beat, close, renew):
        try:
            decode(dumps(doc))
            verdicts.add(True)
        except WireError:
            verdicts.add(False)
    assert len(verdicts) == 1, f"{rid!r}: accepted by some schemas, refused by others"


def test_running_items_take_the_shape_of_their_kind() -> None:
    ok = [{"kind": "reservation", "id": "r-1"}, {"kind": "exec", "id": "e.1"}]
    beat = decode(dumps(wire("worker.heartbeat", running=ok))).body
    assert isinstance(beat, WorkerHeartbeat)
    assert beat.running == ok
    for bad in ({"kind": "reservation", "id": "x" * 65}, {"kind": "exec", "id": "a b"},
                {"kind": "job", "id": "j1"}, {"kind": "exec", "id": "e1", "extra": 1},
                {"kind": "exec"}):
        assert reject(dumps(wire("worker.heartbeat", running=[*ok, bad]))).code == "invalid"


# ----------------------------------------------------------------------- bounds

COSTLY_CHARS = ["\U0001f600", "\u0001", "\u00e9", "~", "a", "0"]


def _encoded(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def largest(schema: Any, where: str = "") -> Any:
    """The instance of a resolved schema that encodes longest: every string at its maximum
    length in the costliest character its pattern allows (an astral character is 12 bytes
    of JSON), every list full, every optional property present. Fails on anything
    unbounded, so it also proves that the schema bounds everything."""
    if schema is True or schema == {}:
        pytest.fail(f"{where}: accepts anything")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return max(schema["enum"], key=_encoded)
    if "anyOf" in schema and "properties" in schema:  # alternatives of required keys
        schema = {k: v for k, v in schema.items() if k != "anyOf"}  # all keys are present
    if "anyOf" in schema:
        return max((largest(s, where) for s in schema["anyOf"]), key=_encoded)
    t = _type_of(schema)
    if t == "string":
        assert "maxLength" in schema, f"{where}: unbounded string"
        pattern = schema.get("pattern")
        for ch in COSTLY_CHARS:
            value = ch * schema["maxLength"]
            if pattern is None or re.search(pattern, value):
                return value
        pytest.fail(f"{where}: no sample matches {pattern}")
    if t == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1)
        return max(low, high, key=lambda v: len(str(v)))
    if t == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1.7e308))
        high = schema.get("maximum", 1.7e308)
        return low * 0.87654321098765432 + high * 0.12345678901234567
    if t == "boolean":
        return False
    if t == "null" or schema.get("type") == "null":
        return None
    if t == "array":
        assert "maxItems" in schema, f"{where}: unbounded list"
        return [largest(schema["items"], f"{where}[]")] * schema["maxItems"]
    if t == "object":
        assert schema.get("additionalProperties") is False, f"{where}: open object"
        return {k: largest(v, f"{where}.{k}") for k, v in schema["properties"].items()}
    pytest.fail(f"{where}: no type")


def _definition(name: str, definition: str) -> Any:
    return resolved_definition(name, definition)


def resolved_definition(name: str, definition: str) -> Any:
    from schemas.registry import _inline

    return _inline({"$ref": f"{name}.json#/definitions/{definition}"}, name)


def test_the_largest_caps_document_fits_a_workers_show_reply_with_room_to_spare() -> None:
    """Issue 8, item 1: a worker's caps are bounded far below the payload limit, and so is
    the largest ``workers.show.reply`` (largest caps, largest metrics, every event)."""
    from coordinator.store.workers import CAPS_MAX_BYTES
    from schemas.codec import DEFAULT_MAX_PAYLOAD
    from schemas.messages import WorkersShowReply
    from schemas.registry import definition_validator

    caps = largest(resolved_definition("worker.caps", "caps"), "caps")
    definition_validator("worker.caps", "caps")(caps)
    jsonschema.Draft7Validator(resolved_definition("worker.caps", "caps")).validate(caps)
    metrics = largest(resolved_definition("worker.heartbeat", "metrics"), "metrics")
    definition_validator("worker.heartbeat", "metrics")(metrics)
    worker = largest(resolved_definition("envelope", "worker_summary"), "worker")
    assert worker["caps"] == caps
    assert worker["last_metrics"] == metrics
    reply = encode(envelope(WorkersShowReply(worker=worker), re="r" * 64))
    caps_bytes, reply_bytes = len(json.dumps(caps, separators=(",", ":"))), len(reply)
    print(f"\nlargest caps {caps_bytes} bytes, metrics {_encoded(metrics)}, "
          f"workers.show.reply {reply_bytes} (limit {DEFAULT_MAX_PAYLOAD})")
    assert caps_bytes <= CAPS_MAX_BYTES, "the store would refuse a valid document"
    assert caps_bytes < DEFAULT_MAX_PAYLOAD // 4
    assert reply_bytes < DEFAULT_MAX_PAYLOAD // 2


@pytest.mark.parametrize("part", ["cpu", "host", "docker", "shared", "gpus"])
def test_caps_refuse_extra_properties_and_long_strings(part: str) -> None:
    """What a hostile worker used to store: extra keys and megabytes in open objects."""
    good = wire("worker.caps", full=True)
    assert decode(dumps(good)).type == "worker.caps"
    inner = good[part][0] if part == "gpus" else good[part]
    extra = copy.deepcopy(good)
    (extra[part][0] if part == "gpus" else extra[part])["padding"] = "x" * 100
    assert reject(dumps(extra)).code == "invalid"
    for key, value in inner.items():
        if isinstance(value, str):
            long = copy.deepcopy(good)
            (long[part][0] if part == "gpus" else long[part])[key] = "x" * 4000
            assert reject(dumps(long)).code == "invalid", key
    near_limit = copy.deepcopy(good)
    (near_limit[part][0] if part == "gpus" else near_limit[part])["model"] = (
        "x" * (DEFAULT_MAX_PAYLOAD_FOR_TESTS - 4096))
    assert reject(dumps(near_limit)).code == "invalid"


DEFAULT_MAX_PAYLOAD_FOR_TESTS = 4 * 1024 * 1024


def test_gpus_fit_in_caps_and_heartbeats() -> None:
    """Room for GPUs (issue 11): bounded, optional, index required."""
    gpu = {"index": 0, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3",
           "uuid": "GPU-5e0b5a34-3c31-5e93-2d2f-8d1d0d0c9b1e", "memory_bytes": 85_520_809_984,
           "driver": "550.54.15", "compute_capability": "9.0"}
    caps = decode(dumps(wire("worker.caps", gpus=[gpu, {"index": 1, "uuid": None}]))).body
    assert isinstance(caps, WorkerCaps)
    assert caps.gpus == [gpu, {"index": 1, "uuid": None}]
    use = {"index": 0, "util_percent": 97.0, "memory_used_bytes": 1 << 34, "temperature_c": 61}
    beat = decode(dumps(wire("worker.heartbeat", gpus=[use]))).body
    assert isinstance(beat, WorkerHeartbeat)
    assert beat.gpus == [use]
    for bad_caps in ([{"vendor": "nvidia"}], [gpu] * 17, [{**gpu, "clock": 1}],
                     [{**gpu, "name": "x" * 129}]):
        assert reject(dumps(wire("worker.caps", gpus=bad_caps))).code == "invalid"
    for bad_use in ([{**use, "util_percent": 101}], [{"index": 0}], [use] * 17):
        assert reject(dumps(wire("worker.heartbeat", gpus=bad_use))).code == "invalid"
