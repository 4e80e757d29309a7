"""Small results that ride in their attempt's report (``attempt.report`` ``inline``).

A job's stdout, stderr or output of at most ``INLINE_MAX_BYTES`` (at most
``INLINE_MAX_FILES`` of them) comes base64 in the report instead of one upload each
(docs/jobs.md, "Small results"). An upload is an ``xfer.init``, a segment, an ``xfer.fin``
and a dozen store calls on the coordinator's transfer lane; a sweep whose jobs each print
a line or write a small file spent several times the job's own cost on them (29 jobs/s
against 116 inline, BENCHMARKS.md §10). Here each is checked and stored
as its upload would have been (``DataSink.put_small``: the attempt's grant, the result's
name, the owner's quota), before the report itself is recorded: a refused one (the quota
is full) is left out of the report and named in its error, as the worker does for a
refused upload. A stale or repeated report stores nothing (its attempt is no longer live:
no grant), and the store decides the report as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from broker.transfer import REFUSED_FOR_GOOD, TransferRefused
from coordinator.data_sink import DataSink
from coordinator.handling import Refusal
from coordinator.store import Store
from schemas.job_messages import INLINE_MAX_BYTES, AttemptReport

log = logging.getLogger(__name__)



@dataclass
class KeptResults:
    """The report's result refs once its inline bytes are stored (refused ones dropped)."""

    stdout: dict[str, Any] | None
    stderr: dict[str, Any] | None
    outputs: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # "NAME not kept: why", for the error


def decode_inline(report: AttemptReport) -> dict[str, bytes]:
    """The inline bytes by sha256; ``invalid`` when one is not base64, is too large, or
    does not hash to its address (a worker's bug, or a forgery: nothing is stored)."""
    found: dict[str, bytes] = {}
    for item in report.inline or ():
        sha = str(item.get("sha256", ""))
        try:
            data = base64.b64decode(str(item.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise Refusal("invalid", f"inline result {sha[:12]}… is not base64") from None
        if len(data) > INLINE_MAX_BYTES:
            raise Refusal("invalid", f"inline result {sha[:12]}… is over "
                          f"{INLINE_MAX_BYTES} bytes: upload it")
        if hashlib.sha256(data).hexdigest() != sha:
            raise Refusal("invalid", f"inline result {sha[:12]}… does not match its sha256")
        found[sha] = data
    return found


def keep_inline(sink: DataSink | None, store: Store, wid: str,
                report: AttemptReport) -> KeptResults:
    """Store the report's inline results (see the module docstring); the refs to record."""
    kept = KeptResults(report.stdout, report.stderr, list(report.outputs or ()))
    inline = decode_inline(report)
    if not inline:
        return kept
    for ref in (kept.stdout, kept.stderr, *kept.outputs):  # all checked before any is stored
        data = inline.get(str(ref.get("sha256"))) if ref is not None else None
        if data is not None and ref is not None and int(ref.get("size", -1)) != len(data):
            raise Refusal("invalid", f"a result of size {ref.get('size')} has {len(data)} "
                          "bytes inline")
    if sink is None:
        raise Refusal("unavailable", "this coordinator keeps no data: upload the results")
    grant = store.attempt_grant(report.attempt, wid)
    if grant is None:
        return kept  # not live on wid: stale, repeated or not its own (record_report says)
    job, owner = grant

    def keep(ref: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        if ref is None or str(ref.get("sha256")) not in inline:
            return ref  # uploaded (or no such result)
        data = inline[str(ref["sha256"])]
        purpose = {"kind": "data", "owner": owner, "name": name, "grant": report.attempt}
        try:
            sink.put_small(wid, purpose, data, grant=grant)
        except TransferRefused as err:
            if err.code not in REFUSED_FOR_GOOD:
                raise Refusal(err.code, str(err)) from err
            log.warning("attempt %s: %s not kept (%s: %s)", report.attempt, name, err.code,
                        err)
            kept.notes.append(f"{name.rpartition('/')[2] or name} not kept: {err}")
            return None
        except OSError as err:  # the data dir: the worker sends the report again
            raise Refusal("internal", f"cannot store {name}: {err.strerror or err}") from err
        return ref

    kept.stdout = keep(kept.stdout, f"{job}/stdout")
    kept.stderr = keep(kept.stderr, f"{job}/stderr")
    outputs: list[dict[str, Any]] = []
    for item in kept.outputs:
        if keep(item, f"{job}/outputs/{item.get('name')}") is not None:
            outputs.append(item)
    kept.outputs = outputs
    return kept
