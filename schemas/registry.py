"""Loads the JSON Schema files and compiles one fast validator per message type.

Cross-file ``$ref`` pointers (``envelope.json#/definitions/x``) are inlined at load time,
so both ``jsonschema`` (tests) and ``fastjsonschema`` (runtime) see self-contained schemas.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastjsonschema

SCHEMA_DIR = Path(__file__).with_name("json")
ASYNCAPI_FILE = Path(__file__).with_name("asyncapi.yaml")
ENVELOPE = "envelope"

Validator = Callable[[Any], Any]


@functools.cache
def _raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    return data


def _pointer(doc: Any, pointer: str) -> Any:
    for part in [p for p in pointer.split("/") if p]:
        doc = doc[part.replace("~1", "/").replace("~0", "~")]
    return doc


def _inline(node: Any, current: str) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            file, _, frag = ref.partition("#")
            target_name = file[: -len(".json")] if file else current
            target = _pointer(_raw(target_name), frag)
            if not frag:
                target = {k: v for k, v in target.items() if k not in ("$schema", "definitions")}
            return _inline(target, target_name)
        return {k: _inline(v, current) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, current) for v in node]
    return node


def schema_names() -> list[str]:
    """Every message type that has a schema file (the envelope excluded)."""
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json") if p.stem != ENVELOPE)


@functools.cache
def resolved_schema(name: str) -> dict[str, Any]:
    """The schema of ``name`` with every reference inlined."""
    schema = dict(_inline(_raw(name), name))
    schema.pop("definitions", None)
    return schema


@functools.cache
def validator(name: str) -> Validator:
    """A compiled validator; raises ``fastjsonschema.JsonSchemaException`` on bad data."""
    compiled: Validator = fastjsonschema.compile(resolved_schema(name))
    return compiled


@functools.cache
def definition_validator(name: str, definition: str) -> Validator:
    """A compiled validator of ``{name}.json#/definitions/{definition}``: the shape of a
    document that travels inside messages and is stored (a worker's caps, its metrics)."""
    schema = _inline({"$ref": f"{name}.json#/definitions/{definition}"}, name)
    compiled: Validator = fastjsonschema.compile(schema)
    return compiled
