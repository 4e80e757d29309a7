"""codec.encode splices long strings that need no JSON escaping (schemas/codec.py
``_dumps``): exec.stdin and exec.output carry up to 1.4 MB of base64 each, and
json.dumps' escape scan of it cost as much as the base64 itself. The bytes must decode
to exactly what json.dumps would have given, and anything that does need escaping must
still be escaped."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from schemas.codec import SPLICE_MIN, _dumps, decode, encode, envelope
from schemas.exec_messages import ExecStdin


def test_a_megabyte_of_stdin_round_trips_through_the_codec() -> None:
    raw = os.urandom(1 << 20)
    body = ExecStdin(grant="claims-claims-claims.signature", exec_id="e-1", seq=7,
                     data=base64.b64encode(raw).decode(), eof=True)
    payload = encode(envelope(body, reply_to="xcloud/x/inbox"))
    back = decode(payload).body
    assert back == body
    assert base64.b64decode(back.data) == raw
    assert json.loads(payload) == json.loads(json.dumps(json.loads(payload)))


@pytest.mark.parametrize("value", [
    base64.b64encode(os.urandom(SPLICE_MIN)).decode(),  # spliced
    'say "hi" \\ ' * (SPLICE_MIN // 8),  # quotes and backslashes: escaped
    "line\n" * (SPLICE_MIN // 4),  # control characters: escaped
    "é" * SPLICE_MIN,  # not ASCII: escaped
    "short",
])
def test_the_json_value_is_what_json_dumps_gives(value: str) -> None:
    data: dict[str, Any] = {"type": "t", "data": value, "seq": 1, "more": [1, "a"]}
    assert json.loads(_dumps(data)) == data
    assert json.loads(_dumps({"data": value})) == {"data": value}
    two = {"a": value, "b": value, "n": None}
    assert json.loads(_dumps(two)) == two
