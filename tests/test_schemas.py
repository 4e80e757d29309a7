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
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from schemas.codec import ENVELOPE_KEYS, Envelope, decode, encode, envelope
from schemas.errors import WireError
from schemas.messages import REGISTRY, Body
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
