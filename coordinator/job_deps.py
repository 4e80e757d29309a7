"""Job dependencies (docs/jobs.md, "Dependencies"): a job submitted with ``after`` stays
``queued`` but unschedulable while some parent has not completed.

No new job state: ``xc_job.waiting`` counts the parents not completed yet and the
scheduler's queue index leads with ``(state, waiting)``, so waiting jobs cost the queue
walk nothing. ``xc_job_edge(parent, child)`` finds a parent's children when it ends, in
the same transaction as its change: a completion counts ``waiting`` down; a failure or
a cancellation holds the waiting children (hold code ``dependency``) or, with
``after_policy: cancel``, cancels them (and so on down their own children). Parents must
exist when the child is submitted, so a cycle cannot be built.

Futures as inputs (docs/jobs.md, "Futures as inputs"): an input ``{name, job, output}``
names an output file of a parent (or its ``stdout``/``stderr``); the parent joins
``after`` (``link_inputs``, at submit). When the child is about to be assigned
(``resolve_inputs``, from the scheduler) the item becomes a plain ``{name, sha256}`` read
from the parent's counted result (``job_result``: the canonical one of a replicated job),
the spec is rewritten and an ``xc_data_ref`` of kind job keeps the object for the child;
so the worker, ``worker_may_read`` and the prefetch see only plain inputs. A parent that
completed without that output holds the child (code ``input``, reason
``input_missing: ...``). Empty files are not stored (the worker uploads nothing for
them), so an empty output is a missing one.

These functions run inside the caller's transaction, on ``coordinator.store.jobs``'s
statements and models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from coordinator.errors import InvalidArgument, NotFound
from coordinator.job_state import JOB_MACHINE, JobState
from coordinator.store.job_records import HOLD_REASON_MAX, JobChange, JobRecord, ResultRecord
from coordinator.store.statements import Statements
from coordinator.store.values import chunks, dumps, loads, tuples

if TYPE_CHECKING:
    from coordinator.store import Store

log = logging.getLogger(__name__)

MAX_PARENTS = 64
POLICIES = ("hold", "cancel")
HOLD_CODE = "dependency"
INPUT_HOLD_CODE = "input"  # the inputs are missing (envelope.json#/definitions/hold_code)
STREAMS = ("stdout", "stderr")  # the outputs an input may name beside the output files
# The columns ``submit_columns`` may set, as a job without ``after`` has them.
COLUMN_DEFAULTS: dict[str, Any] = {"waiting": 0, "after": "[]", "hold_code": None,
                                   "hold_reason": None, "hold_detail": None, "ended_at": None}


def parents_of(spec: dict[str, Any]) -> list[str]:
    """The spec's ``after`` ids, each once, in order."""
    after = spec.get("after") or []
    if not isinstance(after, list) or len(after) > MAX_PARENTS:
        raise InvalidArgument(f"after lists at most {MAX_PARENTS} job ids")
    return list(dict.fromkeys(str(p) for p in after))


def input_refs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's inputs that are futures (``{name, job, output}``)."""
    return [i for i in spec.get("inputs") or () if isinstance(i, dict) and "job" in i]


def link_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the jobs its future inputs name added to ``after`` (a future is a
    dependency whether or not the client listed it)."""
    jobs = [str(i["job"]) for i in input_refs(spec)]
    if not jobs:
        return spec
    after = spec.get("after") or []
    return {**spec, "after": list(dict.fromkeys([*map(str, after), *jobs]))}


def policy_of(spec: dict[str, Any]) -> str:
    policy = str(spec.get("after_policy") or "hold")
    if policy not in POLICIES:
        raise InvalidArgument(f"after_policy is one of {', '.join(POLICIES)}")
    return policy


def parent_states(sql: Statements, parents: Sequence[str], *, owner: str,
                  admin: bool) -> dict[str, JobState]:
    """The parents' states, read for update (a racing completion waits for the
    submit). ``NotFound`` for a parent that does not exist or is someone else's (an
    admin may name anyone's): ids never leak."""
    states: dict[str, JobState] = {}
    for part in chunks(sorted(set(parents)), 200):
        marks = ", ".join("{?}" for _ in part)
        for jid, who, state in sql.tuples(
                "SELECT {id}, {owner}, {state} FROM {job} WHERE {id} IN (" + marks + "){lock}",
                *part):
            if who == owner or admin:
                states[jid] = JobState(state)
    for jid in parents:
        if jid not in states:
            raise NotFound(f"no job {jid} (after lists jobs already submitted, your own)")
    return states


def submit_columns(spec: dict[str, Any], states: dict[str, JobState], t: float
                   ) -> tuple[dict[str, Any], list[str]]:
    """The dependency columns of a new job and the parents it waits for (its edges).

    A parent already failed or cancelled holds (or, by policy, cancels) it at once."""
    parents = parents_of(spec)
    pending = [p for p in parents if states[p] is not JobState.COMPLETED]
    columns: dict[str, Any] = {"waiting": len(pending)}
    dead = [p for p in parents if states[p] in (JobState.FAILED, JobState.CANCELLED)]
    if dead:
        reason = f"parent job {dead[0]} {states[dead[0]].value}"
        if policy_of(spec) == "cancel":
            columns.update(state=JobState.CANCELLED.value, ended_at=t)
        else:
            columns.update(state=JobState.HELD.value, hold_code=HOLD_CODE,
                           hold_reason=reason[:HOLD_REASON_MAX],
                           hold_detail=f"waits for {dead[0]} (after), which ended "
                           f"{states[dead[0]].value}")
    return columns, pending


def settle_children(sql: Statements, models: Any, parent: str, ended: JobState,
                    t: float) -> list[JobChange]:
    """``parent`` reached the terminal state ``ended``: count its children's ``waiting``
    down (completed), or hold or cancel the waiting ones (failed, cancelled); cancelled
    children settle their own children in turn. Returns the changes to announce."""
    Edge = models.JobEdge
    changes: list[JobChange] = []
    todo = [(parent, ended)]
    while todo:
        jid, state = todo.pop()
        children = [c for (c,) in tuples(Edge.select(Edge.child).where(Edge.parent == jid))]
        if not children:
            continue
        Edge.delete().where(Edge.parent == jid).execute()
        for child in children:
            if state is JobState.COMPLETED:
                sql.run("UPDATE {job} SET {waiting} = {waiting} - 1 "
                        "WHERE {id} = {?} AND {waiting} > 0", child)
                continue
            rows = sql.rows("SELECT {owner}, {state}, {spec} FROM {job} WHERE {id} = {?}{lock}",
                            child)
            if not rows or rows[0]["state"] != JobState.QUEUED.value:
                continue  # held, cancelled by someone: leave it where it is
            cancel = loads(rows[0]["spec"], {}).get("after_policy") == "cancel"
            reason = f"parent job {jid} {state.value}"
            if cancel:
                moved = sql.run("UPDATE {job} SET {state} = {?}, {ended_at} = {?}, "
                                "{updated_at} = {?} WHERE {id} = {?} AND {state} = {?}",
                                JobState.CANCELLED.value, t, t, child, JobState.QUEUED.value)
                target = JobState.CANCELLED
            else:
                moved = sql.run("UPDATE {job} SET {state} = {?}, {hold_code} = {?}, "
                                "{hold_reason} = {?}, {hold_detail} = {?}, {updated_at} = {?} "
                                "WHERE {id} = {?} AND {state} = {?}",
                                JobState.HELD.value, HOLD_CODE, reason[:HOLD_REASON_MAX],
                                f"waits for {jid} (after), which ended {state.value}", t,
                                child, JobState.QUEUED.value)
                target = JobState.HELD
            if moved:
                changes.append(JobChange(child, rows[0]["owner"], target, t, reason=reason))
                if target is JobState.CANCELLED:
                    todo.append((child, JobState.CANCELLED))
    if changes:
        log.info("job %s %s: %d dependent job(s) held or cancelled", parent, ended.value,
                 len(changes))
    return changes


def output_ref(result: ResultRecord | None, output: str) -> dict[str, Any] | None:
    """The data ref (``{sha256, size}``) of a completed job's ``output``: a stream name or
    an output file's name; None when the job has no such (non-empty) output."""
    if result is None:
        return None
    if output in STREAMS:
        ref = result.stdout if output == "stdout" else result.stderr
        return ref if isinstance(ref, dict) and ref.get("sha256") else None
    for item in result.outputs:
        if isinstance(item, dict) and item.get("name") == output and item.get("sha256"):
            return item
    return None


def resolve_inputs(store: Store, job: JobRecord, t: float
                   ) -> tuple[JobRecord | None, list[JobChange]]:
    """Turn ``job``'s future inputs into data refs before it is assigned (its parents
    have completed: ``waiting`` is 0). Returns the job with its rewritten spec, or None
    (it is no longer queued, or held because a parent lacks the output: that change is
    returned to announce). Results of completed jobs never change, so they are read
    before the transaction, through the store's ``job_result``."""
    refs = input_refs(job.spec)
    if not refs:
        return job, []
    results = {p: store.job_result(p) for p in dict.fromkeys(str(i["job"]) for i in refs)}
    inputs: list[dict[str, Any]] = []
    resolved: set[str] = set()
    missing = ""
    for item in job.spec.get("inputs") or ():
        if not (isinstance(item, dict) and "job" in item):
            inputs.append(item)
            continue
        ref = output_ref(results[str(item["job"])], str(item["output"]))
        if ref is None:
            missing = (f"input_missing: job {item['job']} completed without output "
                       f"{item['output']!r} (input {item['name']!r})")
            break
        inputs.append({"name": item["name"], "sha256": ref["sha256"]})
        resolved.add(str(ref["sha256"]))
    sql, models = store._sql, store.models
    Obj, Ref = models.DataObject, models.DataRef
    with store._session(), store.db.atomic():
        rows = sql.rows("SELECT {state}, {waiting} FROM {job} WHERE {id} = {?}{lock}", job.id)
        if not rows or rows[0]["state"] != JobState.QUEUED.value or rows[0]["waiting"]:
            return None, []
        if missing:
            JOB_MACHINE.check(job.id, JobState.QUEUED, JobState.HELD)
            sql.run("UPDATE {job} SET {state} = {?}, {hold_code} = {?}, {hold_reason} = {?}, "
                    "{hold_detail} = {?}, {updated_at} = {?} WHERE {id} = {?} AND {state} = {?}",
                    JobState.HELD.value, INPUT_HOLD_CODE, missing[:HOLD_REASON_MAX],
                    "a future input names an output its job did not produce (empty files "
                    "are not kept): submit this job again once a job produces it (a "
                    "workflow rerun does)", t,
                    job.id, JobState.QUEUED.value)
            log.info("job %s held: %s", job.id, missing)
            return None, [JobChange(job.id, job.owner, JobState.HELD, t, reason=missing)]
        spec = {**job.spec, "inputs": inputs}
        sql.run("UPDATE {job} SET {spec} = {?}, {updated_at} = {?} WHERE {id} = {?}",
                dumps(spec), t, job.id)
        for sha in sorted(resolved):
            if (Obj.get_or_none(Obj.sha256 == sha) is not None and Ref.get_or_none(
                    (Ref.sha256 == sha) & (Ref.kind == "job") & (Ref.ref_id == job.id)) is None):
                Ref.insert(sha256=sha, kind="job", ref_id=job.id, owner=job.owner,
                           created_at=t).execute()
    return replace(job, spec=spec), []
