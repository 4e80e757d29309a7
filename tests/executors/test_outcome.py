"""One exit-outcome type: the executor's ExitResult and the exec.exit / exec.report
messages take their exit fields from schemas.outcome.Outcome, and the two schemas share
one definition of them (envelope.json#/definitions/outcome)."""

from __future__ import annotations

import json

import pytest

from schemas.codec import decode, encode, envelope
from schemas.errors import WireError
from schemas.messages import ExecExit, ExecReport
from schemas.outcome import OUTCOME_FIELDS, Outcome
from schemas.registry import SCHEMA_DIR, resolved_schema
from worker.executors.base import ExitResult


@pytest.mark.parametrize("cls", [ExitResult, ExecExit, ExecReport])
def test_exit_types_are_outcomes(cls: type) -> None:
    assert issubclass(cls, Outcome)


@pytest.mark.parametrize("mtype", ["exec.exit", "exec.report"])
def test_schemas_share_the_outcome_definition(mtype: str) -> None:
    raw = json.loads((SCHEMA_DIR / f"{mtype}.json").read_text())
    definition = json.loads((SCHEMA_DIR / "envelope.json").read_text())["definitions"]["outcome"]
    assert set(definition["properties"]) == set(OUTCOME_FIELDS)
    for name in OUTCOME_FIELDS:
        assert raw["properties"][name] == {
            "$ref": f"envelope.json#/definitions/outcome/properties/{name}"}
    resolved = resolved_schema(mtype)["properties"]
    assert {n: resolved[n] for n in OUTCOME_FIELDS} == {
        n: resolved_schema("exec.exit")["properties"][n] for n in OUTCOME_FIELDS}


def test_a_report_carries_the_exit_it_reports() -> None:
    result = ExitResult(exit_code=None, signal=9, duration_s=1.5, oom_killed=True)
    exit_body = ExecExit(exec_id="e1", last_seq=3, duration_s=result.duration_s,
                         exit_code=result.exit_code, signal=result.signal,
                         oom_killed=result.oom_killed, truncated=False, output_bytes=12)
    report = ExecReport(reservation="r1", client="alice", exec_id="e1", command="hog",
                        started_at=1.0, mode="output", **exit_body.outcome_fields())
    for body in (exit_body, report):
        again = decode(encode(envelope(body))).body
        assert again == body
        assert again.outcome() == exit_body.outcome()
    assert report.describe() == "out of memory"
    assert report.returncode == 137
    with pytest.raises(WireError, match="mode"):
        encode(envelope(ExecReport(reservation="r1", client="alice", exec_id="e1",
                                   command="x", started_at=1.0, mode="sideways")))
