"""Job dependencies (docs/jobs.md, "Dependencies"): a job submitted with ``after`` stays
``queued`` but unschedulable while some parent has not completed.

No new job state: ``xc_job.waiting`` counts the parents not completed yet and the
scheduler's queue index leads with ``(state, waiting)``, so waiting jobs cost the queue
walk nothing. ``xc_job_edge(parent, child)`` finds a parent's children when it ends, in
the same transaction as its change: a completion counts ``waiting`` down; a failure or
a cancellation holds the waiting children (hold code ``dependency``) or, with
``after_policy: cancel``, cancels them (and so on down their own children). Parents must
exist when the child is submitted, so a cycle cannot be built.

These functions run inside the caller's transaction, on ``coordinator.store.jobs``'s
statements and models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from coordinator.errors import InvalidArgument, NotFound
from coordinator.job_state import JobState
from coordinator.store.job_records import HOLD_REASON_MAX, JobChange
from coordinator.store.statements import Statements
from coordinator.store.values import chunks, loads, tuples

log = logging.getLogger(__name__)

MAX_PARENTS = 64
POLICIES = ("hold", "cancel")
HOLD_CODE = "dependency"
# The columns ``submit_columns`` may set, as a job without ``after`` has them.
COLUMN_DEFAULTS: dict[str, Any] = {"waiting": 0, "after": "[]", "hold_code": None,
                                   "hold_reason": None, "hold_detail": None, "ended_at": None}


def parents_of(spec: dict[str, Any]) -> list[str]:
    """The spec's ``after`` ids, each once, in order."""
    after = spec.get("after") or []
    if not isinstance(after, list) or len(after) > MAX_PARENTS:
        raise InvalidArgument(f"after lists at most {MAX_PARENTS} job ids")
    return list(dict.fromkeys(str(p) for p in after))


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
