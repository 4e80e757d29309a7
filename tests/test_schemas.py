"""The wire contract: JSON Schema files, their dataclasses, the codec and the AsyncAPI file.

Instances are generated from the schemas themselves (minimal: required properties only;
full: every property), so a new message type is covered the day its schema lands. The
codec must turn anything it refuses into a ``WireError`` with a stable code, and never
raise anything else: a seeded fuzz loop checks that without hypothesis.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from schemas.codec import ENVELOPE_KEYS, Envelope, decode, encode, envelope
from schemas.errors import WireError
from schemas.messages import REGISTRY, Body, WorkerCaps, WorkerHeartbeat
from schemas.registry import ASYNCAPI_FILE, SCHEMA_DIR, resolved_schema, schema_names

ENVELOPE = set(ENVELOPE_KEYS)
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.json"))
TYPES = sorted(REGISTRY)
INBOX = "xcloud/client/alice/inbox"


def raw_schema(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def ref_registry() -> Registry:
    resources = [(p.name, Resource.from_contents(raw_schema(p), default_specification=DRAFT7))
                 for p in SCHEMA_FILES]
    registry: Registry = Registry().with_resources(resources)
    return registry


# ----------------------------------------------------------------------- instances


def _type_of(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    return t


def sample(schema: Any, full: bool = False, top: bool = False) -> Any:
    """The smallest value the (resolved) schema accepts; ``full`` fills optional keys too.

    ``top``: a message schema, whose envelope keys the caller fills in.
    """
    if schema is True or schema == {}:
        return "x"
    if "allOf" in schema and not top:  # a whole message carried inside another
        parts = [*schema["allOf"], {k: v for k, v in schema.items() if k != "allOf"}]
        props: dict[str, Any] = {}
        for part in parts:  # the envelope's key types, then the message's own keys
            props.update({k: v for k, v in part.get("properties", {}).items()
                          if v is not True or k not in props})
        required = [k for part in parts for k in part.get("required", [])]
        return sample({**parts[-1], "properties": props,
                       "required": list(dict.fromkeys(required))}, full)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema and "properties" in schema:  # alternatives of required keys
        schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, "required": [
            *schema.get("required", []), *schema["anyOf"][0].get("required", [])]}
    if "anyOf" in schema:
        return sample(schema["anyOf"][0], full)
    t = _type_of(schema)
    if t == "string":
        return "x" * max(1, schema.get("minLength", 1))
    if t == "integer":
        if "exclusiveMinimum" in schema:
            return int(schema["exclusiveMinimum"]) + 1
        return max(0, schema.get("minimum", 0))
    if t == "number":
        if "exclusiveMinimum" in schema:
            return schema["exclusiveMinimum"] + 1.5
        return float(max(1, schema.get("minimum", 1)))
    if t == "boolean":
        return False
    if t == "array":
        count = max(schema.get("minItems", 0), 1 if full else 0)
        return [sample(schema.get("items", True), full) for _ in range(count)]
    if t == "object" or "properties" in schema:
        fields: dict[str, Any] = schema.get("properties", {})
        keys = list(fields) if full else list(schema.get("required", []))
        return {k: sample(fields.get(k, True), full) for k in keys
                if not (top and k in ENVELOPE)}
    return "x"


def body_fields(mtype: str, full: bool = False) -> dict[str, Any]:
    value: dict[str, Any] = sample(resolved_schema(mtype), full, top=True)
    return value


def body_of(mtype: str, full: bool = False) -> Body:
    return REGISTRY[mtype].from_dict(body_fields(mtype, full))


def wire(mtype: str, full: bool = False, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": mtype, "v": REGISTRY[mtype].V, "id": "m-1", "ts": 1.5,
                           "reply_to": INBOX, **body_fields(mtype, full)}
    doc.update(extra)
    return doc


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def reject(payload: bytes, **kw: Any) -> WireError:
    with pytest.raises(WireError) as info:
        decode(payload, **kw)
    return info.value


# ----------------------------------------------------------------------- the schema files


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.stem)
def test_every_schema_file_is_valid_draft7(path: Path) -> None:
    raw = raw_schema(path)
    assert raw.get("$schema") == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(raw)
    resolved = resolved_schema(path.stem)
    jsonschema.Draft7Validator.check_schema(resolved)
    assert "$ref" not in json.dumps(resolved), "references are inlined"
    if path.stem != "envelope":
        assert raw.get("title") == path.stem
        assert raw.get("additionalProperties") is False, "messages are closed"
        assert resolved["properties"]["type"] == {"const": path.stem}


def test_registry_and_schema_files_cover_the_same_types() -> None:
    assert set(REGISTRY) == set(schema_names())
    for mtype, cls in REGISTRY.items():
        assert mtype == cls.TYPE


@pytest.mark.parametrize("mtype", TYPES)
def test_dataclass_fields_mirror_the_schema(mtype: str) -> None:
    cls = REGISTRY[mtype]
    schema = resolved_schema(mtype)
    props = set(schema["properties"]) - ENVELOPE
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == props
    required = set(schema.get("required", [])) - ENVELOPE
    no_default = {name for name, f in fields.items()
                  if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING}
    assert no_default == required
    assert schema["properties"]["v"] == {"const": cls.V}
    assert {"type", "v", "id", "ts"} <= set(schema["required"])


@pytest.mark.parametrize("full", [False, True], ids=["minimal", "full"])
@pytest.mark.parametrize("mtype", TYPES)
def test_round_trip_and_all_validators_agree(mtype: str, full: bool) -> None:
    body = body_of(mtype, full)
    env = envelope(body, reply_to=INBOX)
    payload = encode(env)
    back = decode(payload, topic="t")
    assert back == env
    assert isinstance(back.body, REGISTRY[mtype])
    # The raw files (with cross-file $ref) and the inlined schema accept it too.
    doc = json.loads(payload)
    raw = raw_schema(SCHEMA_DIR / f"{mtype}.json")
    jsonschema.Draft7Validator(raw, registry=ref_registry()).validate(doc)
    jsonschema.Draft7Validator(resolved_schema(mtype)).validate(doc)
    # A reply carries re instead of reply_to.
    reply = envelope(body, re=env.id)
    assert decode(encode(reply)).re == env.id


# ----------------------------------------------------------------------- rejections


def test_rejections_carry_a_stable_code() -> None:
    good = wire("workers.show")
    assert isinstance(decode(dumps(good)), Envelope)

    for payload in (b"{", b"", b"\xff\xfe", b"{'single': 1}", b"[1,]"):
        assert reject(payload).code == "bad_json", payload
    for payload in (b"[]", b"1", b'"s"', b"null", b"true"):
        assert reject(payload).code == "bad_envelope", payload
    for mutation in ({"v": "1"}, {"ts": -1}, {"id": ""}, {"id": "x" * 65}, {"reply_to": ""},
                     {"re": 5}, {"type": ""}, {"type": 3}):
        assert reject(dumps({**good, **mutation})).code == "bad_envelope", mutation
    for key in ("type", "v", "id", "ts"):
        assert reject(dumps({k: v for k, v in good.items() if k != key})).code in (
            "bad_envelope",), key

    err = reject(dumps({**good, "type": "no.such.type"}))
    assert err.code == "unknown_type"
    assert "no.such.type" in err.reason
    assert (err.message_id, err.reply_to) == ("m-1", INBOX), "enough context to answer"

    err = reject(dumps({**good, "v": 2}))
    assert err.code == "unsupported_version"
    assert err.message_type == "workers.show"

    for doc in ({**good, "extra": 1}, {**good, "worker": 7},
                {k: v for k, v in good.items() if k != "worker"}):
        err = reject(dumps(doc), topic="some/topic")
        assert err.code == "invalid"
        assert err.topic == "some/topic"
        assert err.message_id == "m-1"
        assert err.reply_to == INBOX

    small = dumps(good)
    assert decode(small, max_payload=len(small)).id == "m-1"
    err = reject(small, max_payload=len(small) - 1)
    assert err.code == "too_large"
    assert err.message_id is None


@pytest.mark.parametrize("mtype", TYPES)
def test_each_type_refuses_mutations_of_its_fields(mtype: str) -> None:
    """Extra keys, missing required keys, and values of a wrong JSON type."""
    schema = resolved_schema(mtype)
    good = wire(mtype, full=True)
    assert decode(dumps(good)).type == mtype
    assert reject(dumps({**good, "zz_extra": 1})).code == "invalid"
    for key in set(schema["required"]) - ENVELOPE:
        doc = {k: v for k, v in good.items() if k != key}
        assert reject(dumps(doc)).code == "invalid", key
    checker = jsonschema.Draft7Validator(schema)
    for key in set(schema["properties"]) - ENVELOPE:
        for wrong in ({"bad": True}, ["x"], "x", 12345, -1, 1.5, None, True):
            doc = {**good, key: wrong}
            if checker.is_valid(doc):
                assert isinstance(decode(dumps(doc)).body, REGISTRY[mtype])
            else:
                assert reject(dumps(doc)).code == "invalid", (key, wrong)


def test_anything_decode_accepts_encodes_again() -> None:
    for mtype in TYPES:
        env = decode(dumps(wire(mtype, full=True)))
        assert decode(encode(env)) == env


# ----------------------------------------------------------------------- fuzz


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**70), 2**70)
    if kind == 3:
        return rng.uniform(-1e6, 1e6)
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.choice(["", "x" * 200, "online", "xcloud/client/a/inbox", "a/b", "\u0000"])
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["type", "v", "id", "ts", "wid", "state", "x", "reply_to", "re"]):
            _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random, doc: dict[str, Any]) -> bytes:
    choice = rng.randrange(8)
    doc = copy.deepcopy(doc)
    if choice == 0:  # replace a value
        key = rng.choice(list(doc))
        doc[key] = _random_json(rng)
    elif choice == 1:  # drop a key
        doc.pop(rng.choice(list(doc)))
    elif choice == 2:  # add a key
        doc[rng.choice(["x", "wid", "state", "re", "detail", "reply_to"])] = _random_json(rng)
    elif choice == 3:  # another type's body under this type
        doc["type"] = rng.choice(TYPES)
    payload = json.dumps(doc).encode()
    if choice == 4:  # flip bytes
        data = bytearray(payload)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        payload = bytes(data)
    elif choice == 5:  # truncate
        payload = payload[: rng.randrange(len(payload))]
    elif choice == 6:  # nest (shallow: deep nesting is its own test below)
        depth = rng.randrange(1, 200)
        payload = b'{"type":"ping","v":1,"id":"n","ts":1,"x":' + b"[" * depth + b"]" * depth + b"}"
    elif choice == 7:  # random bytes
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
    return payload


def test_fuzzed_messages_only_ever_raise_wire_errors() -> None:
    rng = random.Random(20240601)
    seeds = [wire(mtype, full=rng.random() < 0.5) for mtype in TYPES]
    accepted = rejected = 0
    for _ in range(6000):
        payload = _mutate(rng, rng.choice(seeds))
        try:
            env = decode(payload, topic="fuzz", max_payload=1 << 20)
        except WireError as err:
            assert err.code in {"bad_json", "bad_envelope", "unknown_type",  # noqa: PT017 (a probe)
                                "unsupported_version", "invalid", "too_large"}
            rejected += 1
            continue
        except Exception as err:  # the point of the test
            pytest.fail(f"decode raised {type(err).__name__}: {err} for {payload[:200]!r}")
        accepted += 1
        assert isinstance(env.body, Body)
        encode(env)  # what we accepted, we could also send
    assert accepted > 100
    assert rejected > 1000


def test_deeply_nested_json_is_a_wire_error() -> None:
    for payload in (b"[" * 100_000, b'{"a":' * 100_000):
        assert reject(payload).code == "bad_json"


@pytest.mark.parametrize("payload", [
    b'{"type":"reserve","v":1,"id":"x","ts":1,"lease_s":NaN}',
    b'{"type":"ping","v":1,"id":"x","ts":Infinity}',
    b'{"type":"worker.heartbeat","v":1,"id":"x","ts":1,"wid":"w","seq":1,"interval_s":1,'
    b'"cpu_percent":1,"mem_used_bytes":1,"free_slots":1,"load1":-Infinity}',
    b'{"type":"ping","v":1,"id":"x","ts":1e400}',
    b'{"type":"reserve","v":1,"id":"x","ts":1,"lease_s":-1.5e999}',
], ids=["NaN", "Infinity", "-Infinity", "overflow", "-overflow"])
def test_non_finite_numbers_are_refused(payload: bytes) -> None:
    assert reject(payload).code in ("bad_json", "invalid")


def test_random_json_documents_only_ever_raise_wire_errors() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        doc = _random_json(rng)
        if isinstance(doc, dict) and rng.random() < 0.7:
            doc.update({"type": rng.choice(TYPES), "v": 1, "id": "r", "ts": 2.0})
        try:
            decode(dumps(doc))
        except WireError:
            pass
        except Exception as err:
            pytest.fail(f"decode raised {type(err).__name__}: {err} for {doc!r:.200}")


# ----------------------------------------------------------------------- AsyncAPI


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _pointer(doc: Any, pointer: str) -> Any:
    for part in [p for p in pointer.split("/") if p]:
        doc = doc[part.replace("~1", "/").replace("~0", "~")]
    return doc


def test_asyncapi_document_references_every_message_type() -> None:
    doc = yaml.safe_load(ASYNCAPI_FILE.read_text())
    assert isinstance(doc, dict)
    assert str(doc.get("asyncapi")) == "3.0.0"
    refs = _refs(doc)
    assert refs
    for ref in refs:
        file, _, fragment = ref.partition("#")
        if file:
            target = (ASYNCAPI_FILE.parent / file).resolve()
            assert target.is_file(), f"$ref {ref} names a missing file"
            assert target.parent == SCHEMA_DIR.resolve(), ref
            if fragment:
                _pointer(json.loads(target.read_text()), fragment)
        else:
            try:
                _pointer(doc, fragment)
            except (KeyError, IndexError, TypeError):
                pytest.fail(f"$ref {ref} does not resolve inside {ASYNCAPI_FILE.name}")
    messages = doc["components"]["messages"]
    referenced = set()
    for name, message in messages.items():
        payload_ref = message.get("payload", {}).get("$ref", "")
        stem = Path(payload_ref.partition("#")[0]).stem
        if stem:
            referenced.add(stem)
            assert message.get("name", stem) == stem, name
    missing = set(REGISTRY) - referenced
    assert not missing, f"message types without an AsyncAPI message: {sorted(missing)}"


def test_sample_numbers_are_finite() -> None:
    """Guard for the generator above: samples never contain NaN or infinities."""
    for mtype in TYPES:
        text = json.dumps(wire(mtype, full=True))
        assert "NaN" not in text
        assert "Infinity" not in text
        assert all(math.isfinite(v) for v in _numbers(json.loads(text)))


def _numbers(node: Any) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    if isinstance(node, dict):
        return [n for v in node.values() for n in _numbers(v)]
    if isinstance(node, list):
        return [n for v in node for n in _numbers(v)]
    return []


# ----------------------------------------------------------------------- identifiers

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
